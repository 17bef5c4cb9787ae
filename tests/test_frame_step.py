"""The frame step: the schedule it follows, its sampler, compiled == eager, no graph breaks or recompiles,
and a scheduler that keeps live streams flowing while other sessions bring long turns and new voices."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
import torch

from openchroma.cli import main
from openchroma.engine import AudioChunk, Engine, ResponseDone, SamplingParams, Stepper
from openchroma.engine.sampling import gumbel_noise, sample_codes
from openchroma.engine.schedule import backbone_budget, frames_within, response_layout


# ----- the schedule ---------------------------------------------------------------------------------------
def test_budget_and_frames_within_are_inverse():
    for voice in (0, 7, 40):
        for frames in range(1, 60):
            n = backbone_budget(voice, frames)
            assert frames_within(n, voice) == frames
            assert frames_within(n - 1, voice) == frames - 1


def test_stepper_feeds_the_backbone_exactly_as_the_layout_says(tiny_model):
    """The engine's planner and training's teacher-forced sequence come from the same rules."""
    m = tiny_model.model
    st = Stepper(m, 1, reasoner_len=64, backbone_len=200)
    voice_len = 9
    st.backbone_prefill([(0, torch.randn(voice_len, m.cfg.backbone.hidden_size), 0)])
    h = st.reasoner_prefill([(0, m.thinker.model.embed_tokens(torch.tensor([1, 2, 3])), 0)])[0]
    frames = 17
    forced = [5, 6, 7, 8, m.cfg.im_end_token_id]
    st.start(0, voice_len, h, forced[0], 3, SamplingParams(), frames, forced)
    positions, tokens = [], []
    while st.active:
        row = st.rows[0]
        (out,) = st.step()
        positions.append(row.bb_pos)
        tokens.append(out.text_token)
    layout = response_layout(len(forced), frames)
    # After step s the backbone has consumed exactly the entries up to the one that predicts frame s.
    assert positions == [voice_len + i + 1 for i in layout.predicts]
    fed = [j for kind, j in layout.entries if kind == "E"]
    assert [t for t in tokens if t is not None] == [forced[j] for j in fed]


# ----- the sampler ----------------------------------------------------------------------------------------
def _sample(logits, temperature, top_k=0, top_p=1.0, seed=1, counter=0):
    b = logits.shape[0]
    return sample_codes(logits, torch.full((b,), float(temperature)), torch.full((b,), top_k),
                        torch.full((b,), float(top_p)), torch.full((b,), seed), torch.full((b,), counter), False)


def test_sampler_greedy_rows_take_the_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(6, 300)
    assert torch.equal(_sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(_sample(logits, 1.3, top_k=1), logits.argmax(-1))
    assert torch.equal(_sample(logits, 1.3, top_p=1e-6), logits.argmax(-1))


def test_sampler_follows_the_softmax_and_depends_only_on_seed_and_counter():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = torch.stack([_sample(logits, 1.0, seed=3, counter=c) for c in range(4000)]).reshape(-1)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.03, rtol=0)
    # top-k 2 keeps the two likeliest codes, renormalised
    draws = torch.stack([_sample(logits, 1.0, top_k=2, seed=3, counter=c) for c in range(2000)]).reshape(-1)
    assert set(draws.tolist()) == {0, 1}
    # noise is a pure function of (seed, counter): the same row gives the same draw in any batch
    noise = gumbel_noise(torch.tensor([5, 9, 5]), torch.tensor([2, 2, 2]), 50)
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert torch.isfinite(noise).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e39, -1.0, 1e-45, "1"])
def test_sampling_params_refuse_insane_temperatures(bad):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=bad)


def test_seeded_session_gives_the_same_audio_alone_or_beside_others(tiny_chroma):
    sp = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=11)
    voice_audio = np.random.default_rng(1).standard_normal(24000).astype(np.float32) * 0.1
    with Engine(tiny_chroma, max_sessions=3, max_context=256, max_response_frames=12) as eng:
        eng.register_voice("v", voice_audio, "hello", sample_rate=24000)
        alone = eng.create_session("v", sampling=sp)
        alone.add_text("Tell me something.")
        a = alone.respond().result()
        alone.close()
        others = [eng.create_session("v", sampling=SamplingParams(temperature=1.0, seed=i)) for i in range(2)]
        for o in others:
            o.add_text("Another question entirely.")
        together = eng.create_session("v", sampling=sp)
        together.add_text("Tell me something.")
        rs = [o.respond() for o in others] + [together.respond()]
        b = rs[-1].result()
        for r in rs[:-1]:
            r.result()
    assert torch.equal(a.codes, b.codes)


# ----- compiled -------------------------------------------------------------------------------------------
@pytest.mark.slow   # inductor compiles the frame step
def test_compiled_step_equals_eager_on_a_reference_case(fixture_dir, capsys):
    """torch.compile (inductor) of the frame step reproduces the published code's tokens and codes exactly."""
    case = fixture_dir / "case_speech_turn.safetensors"
    status = main(["conformance", "--model", str(fixture_dir), "--case", str(case), "--json", "--device", "cpu",
                   "--compile"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0, report
    assert report["tokens_match"] and report["codes_match"]


@pytest.mark.slow   # compile (dynamo), 200 steps
def test_no_graph_breaks_and_no_recompiles_while_sessions_join_and_leave(tiny_chroma):
    """Every variant traces as one graph (fullgraph), and 200 steps of sessions coming and going, greedy and
    sampled, with and without text pairs, reuse the graphs built at load."""
    from torch._dynamo.utils import counters

    voice_audio = np.random.default_rng(2).standard_normal(24000).astype(np.float32) * 0.1
    with Engine(tiny_chroma, max_sessions=2, max_context=256, max_response_frames=30, compile="eager") as eng:
        graphs = counters["stats"]["unique_graphs"]
        assert len(eng.stepper._fns) == len(eng.stepper.variants())
        eng.register_voice("v", voice_audio, "hello", sample_rate=24000)
        steps = 0
        rng = np.random.default_rng(0)
        while steps < 200:
            sessions = [eng.create_session("v") for _ in range(rng.integers(1, 3))]
            responses = []
            for s in sessions:
                s.add_text("Hi there.")
                sp = SamplingParams(temperature=0.9, seed=int(rng.integers(100))) if rng.random() < 0.5 else None
                responses.append(s.respond(max_frames=int(rng.integers(3, 30)), sampling=sp))
            steps += max(r.result().frames for r in responses)
            for s in sessions:
                s.close()
        assert counters["stats"]["unique_graphs"] == graphs
        assert not counters["graph_break"]


# ----- the scheduler --------------------------------------------------------------------------------------
def _frames_beside_a_long_turn_and_a_new_voice(chroma, long_turn, long_voice) -> dict[str, int]:
    """Frames a live stream made while another session sent a long turn, registered a long voice, and had its
    response prefilled: each piece of that work between two of the engine's own events."""
    with Engine(chroma, max_sessions=2, max_context=1024, max_response_frames=400) as eng:
        eng.register_voice("v", long_voice[: 24000 * 2], "hello", sample_rate=24000)
        live, other = eng.create_session("v"), eng.create_session("v")
        live.add_text("Talk for a while.")
        made: list[float] = []
        marks: dict[str, float] = {}
        first_chunk = threading.Event()

        def interfere():
            first_chunk.wait(30)
            marks["append"] = time.perf_counter()
            other.append_audio(long_turn, 16000)
            marks["voice"] = time.perf_counter()
            eng.register_voice("long", long_voice, "a long reference recording", sample_rate=24000)
            marks["respond"] = time.perf_counter()
            response = other.respond(max_frames=5)
            next(ev for ev in response if isinstance(ev, AudioChunk))
            marks["started"] = response.t_started
            marks["prompt_tokens"] = response.result().usage.prompt_tokens

        worker = threading.Thread(target=interfere)
        resp = live.respond(max_frames=400)
        worker.start()
        for ev in resp:
            if isinstance(ev, AudioChunk):
                made.append(ev.made_at)   # when the engine made it: the consumer's own wake-ups don't count
                first_chunk.set()
            elif isinstance(ev, ResponseDone):
                break
        worker.join()
    made_arr = np.array(made)

    def between(a: str, b: str) -> int:
        return int(((made_arr > marks[a]) & (made_arr < marks[b])).sum())

    return {"append": between("append", "voice"), "voice": between("voice", "respond"),
            "prefill": between("respond", "started"), "prefill_chunks": -(-int(marks["prompt_tokens"]) // 64),
            "total": len(made)}


@pytest.mark.slow   # 25 s turns, wall-clock timing
def test_a_live_stream_keeps_flowing_while_another_user_sends_a_long_turn_and_a_new_voice(tiny_chroma):
    """Another session's 25 s turn (appended in 100 short commands, its windows encoded between frames), a 25 s
    voice registration (off the frame loop) and that session's prefill (in 64-token slices) never hold the
    frame loop for their whole cost: the live stream makes frames during each of them. Counted in frames
    between the engine's own events, so a busy machine slows both sides alike."""
    rng = np.random.default_rng(3)
    long_turn = (rng.standard_normal(16000 * 25) * 0.1).astype(np.float32)
    long_voice = (rng.standard_normal(24000 * 25) * 0.1).astype(np.float32)
    counts = _frames_beside_a_long_turn_and_a_new_voice(tiny_chroma, long_turn, long_voice)
    assert counts["total"] == 400, counts   # the stream outlasted the interference
    # At least one frame per 4 appended pieces (commands get a third of a step's time between frames)...
    assert counts["append"] >= 100 // 4, counts
    # ... frames while the voice was encoded in the caller's thread ...
    assert counts["voice"] >= 1, counts
    # ... and about one frame per prefill chunk (each chunk is one background slice between two frames).
    assert counts["prefill"] >= counts["prefill_chunks"] - 2, counts


def test_prefills_of_sessions_starting_together_are_batched(tiny_chroma):
    voice_audio = np.random.default_rng(4).standard_normal(24000).astype(np.float32) * 0.1
    with Engine(tiny_chroma, max_sessions=3, max_context=256, max_response_frames=4) as eng:
        eng.register_voice("v", voice_audio, "hello", sample_rate=24000)
        alone = []
        for text in ("First question?", "A second, longer question for the model?", "Third."):
            s = eng.create_session("v")
            s.add_text(text)
            alone.append(s.respond().result())
            s.close()
        calls = []
        original = eng.stepper.reasoner_prefill
        eng.stepper.reasoner_prefill = lambda chunks: calls.append(len(chunks)) or original(chunks)
        gate = threading.Event()

        async def three_at_once():
            sessions = [await eng.create_async_session("v") for _ in range(3)]
            for s, text in zip(sessions, ("First question?", "A second, longer question for the model?", "Third."),
                               strict=True):
                await s.add_text(text)
            # The worker waits on the gate while the three responses are asked for: their prefills run together.
            eng.submit(gate.wait, 30)
            asked = [s.respond() for s in sessions]
            gate.set()
            return [await a for a in asked]

        together = [r.result() for r in asyncio.run(three_at_once())]
    assert max(calls) == 3
    for a, b in zip(alone, together, strict=True):
        assert a.tokens == b.tokens and torch.equal(a.codes, b.codes)

