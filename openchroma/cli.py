"""The ``openchroma`` command."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

COMMON_MODEL_HELP = "checkpoint directory or Hugging Face hub repo id (e.g. FlashLabs/Chroma-4B)"


PUBLISHED_MODEL = "FlashLabs/Chroma-4B"


def _add_model_args(p: argparse.ArgumentParser, dtype: str | None = "float32", model: str | None = None) -> None:
    """``--model/--device/--dtype``; ``dtype=None`` means bfloat16 on CUDA, float32 on CPU; ``model`` a default."""
    if model is None:
        p.add_argument("--model", required=True, help=COMMON_MODEL_HELP)
    else:
        p.add_argument("--model", default=model, help=f"{COMMON_MODEL_HELP} (default: {model})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16", "float16"],
                   help=f"weights and activations dtype (default: {dtype or 'bfloat16 on CUDA, float32 on CPU'})")


def _add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="compile the frame step with torch.compile (inductor) before the first response; takes "
                        "a minute or more per batch size at load (default: off; on a GPU the step is also "
                        "captured as CUDA graphs)")


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_init_random(args: argparse.Namespace) -> int:
    from .tools.init_random import read_config_file, write_random_checkpoint

    config = read_config_file(args.config) if args.config else None
    out = write_random_checkpoint(args.preset, args.out, seed=args.seed, config=config)
    sizes = f"'{args.preset}'" if args.preset else f"{args.config}-sized"
    print(f"wrote a random-weight {sizes} checkpoint to {out} (it speaks noise: for tests and benchmarks)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import time

    from .loading import load

    t0 = time.perf_counter()
    lm = load(args.model, device=args.device, dtype=args.dtype)
    dt = time.perf_counter() - t0
    print(json.dumps({"path": str(lm.path), "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                      "parameters": lm.num_parameters, "load_seconds": round(dt, 2),
                      "peak_rss_mib": round(_peak_rss_mib(), 1)}, indent=2))
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from .loading import load
    from .tools.conformance import case_runner, load_case, run_case

    for c in args.case:  # a missing or broken case file is reported before the model loads
        load_case(c)
    lm = load(args.model, device=args.device, dtype=args.dtype, progress=not args.json)
    runner = case_runner(lm, args.case, compile=args.compile)
    if runner.stepper.compile:  # the variants greedy cases use, compiled before the first case
        greedy = [k for k in runner.stepper.variants() if k[0] == "think" or k[3]]
        runner.stepper.warmup(progress=not args.json, keys=greedy)
    reports = [run_case(lm, c, runner) for c in args.case]
    if args.json:
        out = [r.to_dict() for r in reports]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        for r in reports:
            print(r.summary())
    return 0 if all(r.passed for r in reports) else 1


def _sampling(args: argparse.Namespace):
    from .engine.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--voice-audio", required=True, help="reference audio of the voice to clone (1-30 s)")
    p.add_argument("--voice-text", required=True, help="transcript of the reference audio")
    p.add_argument("--out", default="reply.wav",
                   help="where to write the 24 kHz audio: .wav, .flac, .ogg or .mp3 (default: reply.wav)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="at most this many 80 ms frames (default 750 = 60 s; 50 = 4 s for init-random checkpoints)")
    p.add_argument("--temperature", type=float, default=0.0, help="audio-code sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest codes (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


# --out suffix -> (libsndfile format, subtype): what speak/chat can write.
OUT_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS"),
               ".mp3": ("MP3", "MPEG_LAYER_III")}


def check_out_path(out: str) -> None:
    """Raise ``ValueError`` when ``out`` cannot be written (folder missing or read-only, unknown extension), so a
    bad ``--out`` fails before the model loads rather than after it has generated."""
    from pathlib import Path

    path = Path(out).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file name such as {path / 'reply.wav'}")
    if suffix not in OUT_FORMATS:
        raise ValueError(f"--out {out}: cannot write {suffix or 'extension-less'} files; "
                         f"use one of {', '.join(OUT_FORMATS)}")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"--out {out}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--out {out}: not writable (check the permissions of {folder})")


def check_audio_arg(flag: str, path: str) -> None:
    """Decode ``path`` once (``AudioError`` naming the flag when it is missing or unreadable) before any loading."""
    from .audio import AudioError, load_audio

    try:
        load_audio(path, 24000)
    except AudioError as e:
        raise AudioError(f"{flag} {e}") from None


def _max_frames(args: argparse.Namespace) -> int:
    """``--max-frames``, else 60 s, or a few seconds for an init-random checkpoint (it speaks noise)."""
    from .config import RANDOM_DEMO_SECONDS, is_random_checkpoint

    if args.max_frames is not None:
        if args.max_frames < 1:
            raise ValueError(f"--max-frames must be at least 1, got {args.max_frames}")
        return args.max_frames
    if is_random_checkpoint(args.model):
        frames = round(RANDOM_DEMO_SECONDS * 12.5)
        print(f"{args.model} has random weights (init-random): it speaks noise, so the answer stops after "
              f"{RANDOM_DEMO_SECONDS:g} s (--max-frames N for more)", file=sys.stderr)
        return frames
    return 750


def _check_generation_args(args: argparse.Namespace) -> int:
    """Every check that needs no model, before it loads; returns the response's frame limit."""
    check_out_path(args.out)
    check_audio_arg("--voice-audio", args.voice_audio)
    if getattr(args, "audio", None):
        check_audio_arg("--audio", args.audio)
    return _max_frames(args)


def _write_reply(reply, out: str) -> None:
    from pathlib import Path

    import soundfile as sf

    fmt, subtype = OUT_FORMATS[Path(out).suffix.lower()]
    sf.write(str(Path(out).expanduser()), reply.audio.detach().float().cpu().numpy(), reply.sample_rate,
             format=fmt, subtype=subtype)
    secs = reply.audio.numel() / reply.sample_rate
    print(json.dumps({"text": reply.text, "audio": out, "seconds": round(secs, 2),
                      "stop_reason": reply.result.stop_reason}, ensure_ascii=False))


def cmd_speak(args: argparse.Namespace) -> int:
    from .pipeline import Chroma

    max_frames = _check_generation_args(args)
    chroma = Chroma.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    voice = chroma.voice(args.voice_audio, args.voice_text)
    _write_reply(chroma.speak(args.text, voice, max_new_frames=max_frames, sampling=_sampling(args)), args.out)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .pipeline import Chroma

    if not args.audio and not args.text:
        print("openchroma chat: give --audio and/or --text", file=sys.stderr)
        return 2
    max_frames = _check_generation_args(args)
    chroma = Chroma.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    voice = chroma.voice(args.voice_audio, args.voice_text)
    reply = chroma.chat(voice, audio=args.audio, text=args.text, max_new_frames=max_frames,
                        sampling=_sampling(args))
    _write_reply(reply, args.out)
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4, got {text!r}")
    return values


def _sessions_list(text: str) -> list[int]:
    return [] if text.strip() == "0" else _int_list(text)


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from .tools.bench import bench

    command = shlex.join(["openchroma", "bench", "--model", str(args.model)]
                         + (["--device", args.device] if args.device else [])
                         + ["--dtype", args.dtype, "--sessions", ",".join(map(str, args.sessions)) or "0",
                            "--frames", str(args.frames), "--user-seconds", f"{args.user_seconds:g}",
                            "--turns", str(args.turns), "--warmup", str(args.warmup), "--out", str(args.out)])
    if args.compile:
        command += " --compile"
    if args.per_frame:
        command += " --per-frame " + ",".join(map(str, args.per_frame))
    if len(args.per_frame or [1, 2]) != 2 or (args.per_frame and args.per_frame[0] >= args.per_frame[1]):
        print("openchroma bench: --per-frame takes two frame counts, short then long (e.g. 24,200)", file=sys.stderr)
        return 2
    results, paths = bench(args.model, device=args.device, dtype=args.dtype, sessions=args.sessions,
                           frames=args.frames, user_seconds=args.user_seconds, turns=args.turns,
                           warmup=args.warmup, out_dir=args.out, command=command,
                           compile=args.compile,
                           per_frame_lengths=tuple(args.per_frame) if args.per_frame else None)
    print()
    print(paths["md"].read_text(), end="")
    print(f"\nwrote {paths['json']}, {paths['md']} and {paths['png']}")
    return 0


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(",")) if "," in text else (float(text),) * 2
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S or LO,HI seconds, got {text!r}") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 < LO <= HI, got {text!r}")
    return lo, hi


def cmd_loadtest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tools.loadtest import LoadConfig, loadtest

    if args.clients < 1 or args.duration <= 0:
        print("openchroma loadtest: --clients must be at least 1 and --duration positive", file=sys.stderr)
        return 2
    if (args.voice_audio is None) != (args.voice_text is None):
        print("openchroma loadtest: --voice-audio and --voice-text go together", file=sys.stderr)
        return 2
    cfg = LoadConfig(server=args.server, clients=args.clients, duration=args.duration, out=Path(args.out),
                     api_key=args.api_key or None, voice=args.voice,
                     voice_audio=Path(args.voice_audio) if args.voice_audio else None, voice_text=args.voice_text,
                     turn_seconds=args.turn_seconds, response_tokens=args.response_tokens, barge_in=args.barge_in,
                     disconnect=args.disconnect, jitter_ms=args.jitter_ms, seed=args.seed)
    summary, paths = loadtest(cfg)
    print(paths["md"].read_text(), end="")
    print(f"\nwrote {paths['json']}, {paths['md']} and {paths['png']}")
    return 0


def check_model_arg(model: str) -> None:
    """Raise ``CheckpointError`` when ``model`` names a local checkpoint that is not there or not a checkpoint.
    Hub ids (``org/name``, not an existing path) are left to the loader, which downloads them."""
    from pathlib import Path

    from .config import ChromaConfig
    from .loading import CheckpointError, checkpoint_files

    path = Path(model).expanduser()
    if path.is_dir():
        ChromaConfig.from_file(path / "config.json")   # raises ConfigError (a ValueError) naming the problem
        checkpoint_files(path)
        return
    if path.exists():
        raise CheckpointError(f"{model}: not a directory (give the checkpoint directory, not a file)")
    if str(model).count("/") != 1 or str(model).startswith((".", "/", "~")):
        raise CheckpointError(f"{model}: no such checkpoint directory (and not a hub repo id like "
                              "'FlashLabs/Chroma-4B'; `openchroma init-random --preset small --out DIR` writes "
                              "a random-weight one for demos)")


def check_port_free(host: str, port: int) -> None:
    """Raise ``ValueError`` when ``host:port`` cannot be listened on (taken, or not this machine's address)."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as e:
            hint = " (is another server running there? pick another --port)" if e.errno == errno.EADDRINUSE else ""
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from .config import RANDOM_DEMO_SECONDS, is_random_checkpoint
    from .serving.app import ServerConfig, serve

    # Fail at start-up, before anything loads in the background: a server that can never answer must not run.
    check_model_arg(args.model)
    check_port_free(args.host, args.port)
    random_weights = is_random_checkpoint(args.model)
    max_response_seconds = args.max_response_seconds
    if max_response_seconds is None:
        max_response_seconds = RANDOM_DEMO_SECONDS if random_weights else 60.0

    dtype = args.dtype
    if dtype is None:
        import torch

        dtype = "bfloat16" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") \
            else "float32"
    api_key = args.api_key or None
    config = ServerConfig(
        model=args.model, device=args.device, dtype=dtype, api_key=api_key, data_dir=Path(args.data_dir),
        max_sessions=args.max_sessions, max_context=args.max_context, max_response_seconds=max_response_seconds,
        max_upload_bytes=int(args.max_upload_mb * 2**20), default_voice=args.default_voice,
        allow_local_audio=args.allow_local_audio, model_id=args.model_id or Path(str(args.model)).name.lower(),
        compile=args.compile, cuda_graphs=args.cuda_graphs, threads=args.threads,
        allow_origins=tuple(args.allow_origin or ()),
        idle_timeout=args.idle_timeout, max_sessions_per_client=args.max_sessions_per_client,
        send_timeout=args.send_timeout, max_text_chars=args.max_text_chars)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    shown = "localhost" if args.host in ("127.0.0.1", "0.0.0.0", "::") else args.host
    print(f"OpenChroma: loading {args.model} ({dtype}) in the background; GET /health says when it is ready.\n"
          f"  browser client:  http://{shown}:{args.port}/\n"
          f"  OpenAI base_url: http://{shown}:{args.port}/v1   (realtime: ws://{shown}:{args.port}/v1/realtime)\n"
          f"  voice library:   {config.data_dir / 'voices'}" + ("\n  API key required" if api_key else ""))
    if random_weights:
        print(f"  RANDOM WEIGHTS (init-random): the model speaks noise; answers stop after {max_response_seconds:g} s "
              "(--max-response-seconds to change)")
    return serve(config, host=args.host, port=args.port, log_level=args.log_level)   # 1 when the model fails to load


def cmd_eval(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from .eval.models import ScoringModelUnavailable
    from .eval.run import EvalSettings, evaluate
    from .eval.testlist import read_test_list

    if bool(args.model) == bool(args.audio_dir):
        print("openchroma eval: give either --model (synthesise the list) or --audio-dir (score existing audio)",
              file=sys.stderr)
        return 2
    items = read_test_list(args.list, args.task)  # every problem in the list is found before any model loads
    audio_dir = Path(args.audio_dir) if args.audio_dir else None
    settings = EvalSettings(task=args.task, model=args.model, audio_dir=audio_dir,
                            device=args.device, dtype=args.dtype, sim_model=args.sim_model, asr_model=args.asr_model,
                            max_frames=args.max_frames, warmup=args.warmup, progress=not args.no_progress)
    argv = ["openchroma", "eval", "--list", str(args.list), "--task", args.task, "--out", str(args.out),
            "--sim-model", args.sim_model, "--asr-model", args.asr_model]
    argv += ["--model", str(args.model), "--max-frames", str(args.max_frames)] if args.model else \
        ["--audio-dir", str(args.audio_dir)]
    try:
        results = evaluate(items, args.out, settings, command=shlex.join(argv))
    except ScoringModelUnavailable as e:
        print(f"openchroma eval: error: {e}", file=sys.stderr)
        return 1
    s = results["summary"]
    fmt = lambda x, d=3: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    print(f"SIM {fmt(s['sim_mean'])}  WER {fmt(s['wer_mean'])}  TTFT p50 {fmt(s['ttft_ms_p50'], 1)} ms  "
          f"p90 {fmt(s['ttft_ms_p90'], 1)} ms  RTF {fmt(s['rtf_mean'])}  "
          f"({s['utterances']} utterances, {s['failed']} failed)")
    print(f"SIM model: {s['sim_model']}\nASR model: {s['asr_model']}")
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.md'}")
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .eval import listen

    if args.summary:
        summary = listen.summarize_answers(Path(args.summary))
        print(json.dumps(summary, indent=2) if args.json else listen.format_summary(summary).rstrip("\n"))
        return 0
    if not args.pairs or not args.out:
        print("openchroma listen: give --pairs FILE --out DIR to run a test, or --summary DIR", file=sys.stderr)
        return 2
    pairs = listen.read_pairs(args.pairs)  # checked before the server starts
    questions = [q.strip() for q in args.questions.split(",") if q.strip()]
    try:
        listen.serve(pairs, Path(args.out), questions=questions, host=args.host, port=args.port, seed=args.seed)
    except OSError as e:  # the port is taken, the address is not this machine's, ...
        print(f"openchroma listen: error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1


def cmd_prepare(args: argparse.Namespace) -> int:
    from .training.prepare import PrepareLimits, prepare

    meta = prepare(args.model, args.data, args.out, skip_bad=args.skip_bad, shard_size=args.shard_size,
                   device=args.device, dtype=args.dtype,
                   limits=PrepareLimits(max_response_seconds=args.max_response_seconds))
    print(json.dumps({"out": args.out, "examples": meta["examples"], "skipped": meta["skipped"]}))
    return 0


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def cmd_train(args: argparse.Namespace) -> int:
    from .training.train import TrainConfig, train

    cfg = TrainConfig(
        model=args.model, data=args.data, out=args.out, steps=args.steps, lr=args.lr, warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size, grad_accum=args.grad_accum, train=_csv(args.train), lora=args.lora,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=_csv(args.lora_targets), save_adapter=args.save_adapter, decoder_fraction=args.decoder_fraction,
        decoder_loss_weight=args.decoder_loss_weight, holdout=args.holdout, eval_every=args.eval_every,
        log_every=args.log_every, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        resume=not args.no_resume, seed=args.seed, device=args.device, dtype=args.dtype, bf16=not args.no_bf16,
        gradient_checkpointing=args.gradient_checkpointing, fsdp=args.fsdp, tensorboard=not args.no_tensorboard,
        progress=not args.no_progress, stop_after=args.stop_after)
    summary = train(cfg)
    if summary.get("output"):
        print(json.dumps(summary))
    return 0


def _add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-response-seconds", type=float, default=60.0,
                   help="longest response audio accepted; longer rows are bad rows (default 60)")


def cmd_synth(args: argparse.Namespace) -> int:
    from .training.synth import SynthConfig, synth

    cfg = SynthConfig(
        questions=args.questions, voices=args.voices, out=args.out, model=args.model, device=args.device,
        dtype=args.dtype, llm_base_url=args.llm_base_url, llm_model=args.llm_model, llm_api_key=args.llm_api_key,
        tts_base_url=args.tts_base_url, tts_model=args.tts_model, tts_api_key=args.tts_api_key,
        system_prompt=args.system_prompt, max_answer_tokens=args.max_answer_tokens, max_seconds=args.max_seconds,
        user_audio=not args.text_questions, concurrency=args.concurrency, retries=args.retries)
    print(json.dumps(synth(cfg)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openchroma",
        description="OpenChroma: real-time spoken dialogue with voice cloning (FlashLabs Chroma 1.0 weights).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("chat", help="answer one spoken or written turn in a cloned voice, to a WAV file",
                       description="Answer one user turn (audio and/or text) in a cloned voice.")
    _add_model_args(p)
    p.add_argument("--audio", help="the user's audio (wav, flac, ogg, mp3; any rate)")
    p.add_argument("--text", help="the user's text")
    _add_generation_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("speak", help="say a given text in a cloned voice (text to speech), to a WAV file",
                       description="Say the given text in a cloned voice (the forced-text path).")
    _add_model_args(p)
    p.add_argument("--text", required=True, help="what to say")
    _add_generation_args(p)
    p.set_defaults(func=cmd_speak)

    p = sub.add_parser("conformance", help="check a checkpoint against reference case files",
                       description="Run reference cases (case_*.safetensors) and compare tokens, codes, logits "
                                   "and audio. Exit status 0 only when everything matches.")
    _add_model_args(p)
    p.add_argument("--case", required=True, action="append", help="case file (repeat for several)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_compile_arg(p)
    p.set_defaults(func=cmd_conformance)

    p = sub.add_parser("init-random", help="write a random-weight checkpoint (speaks noise; for tests/benchmarks)",
                       description="Write a complete random-weight checkpoint directory in the published layout. "
                                   "Its speech is noise: it exists to run every command without the real weights.")
    sizes = p.add_mutually_exclusive_group(required=True)
    sizes.add_argument("--preset", choices=["tiny", "small", "chroma-4b"],
                       help="sizes: tiny (tests), small (CPU demos), chroma-4b (the published sizes)")
    sizes.add_argument("--config", metavar="FILE",
                       help="sizes from a config.json in the published layout (e.g. ../shared/perf/chroma-mid/"
                            "config.json: the published widths with few layers)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_init_random)

    p = sub.add_parser("prepare", help="run the frozen parts (Mimi, reasoner) over a training manifest, once",
                       description="Read a JSONL manifest (one example a line: voice_audio, voice_text, "
                                   "user_audio and/or user_text, response_text, response_audio; paths relative to "
                                   "the manifest) and store, per example, the Mimi codes of the voice and the "
                                   "response, and the reasoner's hidden states and token ids of the response "
                                   "given the question (teacher-forced on response_text), as safetensors shards "
                                   "in --out. Resumable: run it again to continue. A bad row (missing or "
                                   "unreadable audio, empty text, audio too long, response text longer than "
                                   "the audio carries at one token per two frames) stops with an error naming "
                                   "the row, unless --skip-bad.")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="the manifest (.jsonl)")
    p.add_argument("--out", required=True, help="directory for the prepared shards")
    p.add_argument("--skip-bad", action="store_true", help="skip bad rows (and report how many) instead of stopping")
    p.add_argument("--shard-size", type=int, default=256, help="examples per shard (default 256)")
    _add_prepare_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="fine-tune the Backbone and Decoder (LoRA or full; torchrun for many GPUs)",
                       description="Fine-tune Chroma as the paper trains it: the Reasoner frozen (its features "
                                   "precomputed by `prepare`), the Backbone learning codebook 0 over the "
                                   "inference sequence (voice prompt, then reasoner pairs and frames at 1:2), "
                                   "the Decoder codebooks 1-7 within each frame. --data is a manifest (prepared "
                                   "into OUT/prepared first) or a `prepare` directory. OUT receives a complete "
                                   "checkpoint in the published layout (LoRA merged), metrics.jsonl, TensorBoard "
                                   "logs (tb/) and checkpoints/ (with optimizer state; a rerun with the same "
                                   "OUT resumes exactly). Many processes: `torchrun --nproc-per-node N -m "
                                   "openchroma train ...` (data-parallel: NCCL on GPUs, gloo on CPU); "
                                   "--batch-size is the global batch.")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="manifest (.jsonl) or directory written by `openchroma prepare`")
    p.add_argument("--out", required=True, help="output directory (the fine-tuned checkpoint)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps, then cosine decay (default 0)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine decays to lr x this (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off; default 1)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="examples per optimizer step over all processes (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--train", default="backbone,decoder",
                   help="parts to train: backbone, decoder or both, comma-separated (default both)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="linear layers of the trained parts that get adapters (default: all attention and MLP)")
    p.add_argument("--save-adapter", action="store_true", help="also write the LoRA adapter to OUT/adapter")
    p.add_argument("--decoder-fraction", type=float, default=1.0,
                   help="train the Decoder on this random fraction of frames (amortisation; default 1)")
    p.add_argument("--decoder-loss-weight", type=float, default=1.0,
                   help="loss = loss_c0 + this x loss_c1_7 (default 1)")
    p.add_argument("--holdout", type=int, default=0, help="examples held out for the eval loss (default 0)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (default 0 = off)")
    p.add_argument("--log-every", type=int, default=1, help="write metrics every N steps (default 1)")
    p.add_argument("--save-every", type=int, default=0,
                   help="training checkpoint every N steps (default 0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="training checkpoints kept (default 2)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after step N with a checkpoint, as if interrupted (run again to resume)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, LoRA init, amortisation (default 0)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, ~30%% slower)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard full fine-tuning's weights, gradients and optimizer state over the "
                        "processes (FSDP2) instead of replicating them (DDP): for models that do not fit one GPU")
    p.add_argument("--no-bf16", action="store_true", help="on CUDA, do not autocast to bfloat16")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("synth", help="make training data: questions -> answers (LLM) -> speech in your voices (TTS)",
                       description="The paper's synthetic-data pipeline. Stage 1: each question (a text file, one "
                                   "a line, or JSONL with 'question') is answered by Chroma's own Reasoner (text "
                                   "only, the default; needs --model) or by an OpenAI-compatible chat endpoint "
                                   "(--llm-base-url, --llm-model). Stage 2: each answer is spoken in a voice from "
                                   "--voices (NAME.wav + NAME.txt transcript; voices are used in turn) by an "
                                   "OpenAI-compatible /v1/audio/speech endpoint (--tts-base-url; the voice is sent "
                                   "by NAME) or, by default, by OpenChroma's forced-text speech in-process; the "
                                   "question is spoken too, in the next voice, as the user's audio. Writes "
                                   "OUT/manifest.jsonl for `openchroma prepare`/`train`. Concurrent, with retries; "
                                   "rerun the same command to resume or retry failures.")
    p.add_argument("--questions", required=True, help="questions file (.txt one a line, or .jsonl)")
    p.add_argument("--voices", required=True, help="directory of NAME.wav + NAME.txt reference recordings")
    p.add_argument("--out", required=True, help="output directory (audio, answers.jsonl, manifest.jsonl)")
    p.add_argument("--model", default=None, help="Chroma checkpoint for the in-process Reasoner and speech "
                                                 "(needed unless both endpoints are given)")
    p.add_argument("--device", default=None, help="device of the in-process model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--llm-base-url", default=None, help="OpenAI-compatible base URL for answers, e.g. "
                                                        "http://localhost:8001/v1")
    p.add_argument("--llm-model", default=None, help="model name for --llm-base-url")
    p.add_argument("--llm-api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--tts-base-url", default=None, help="OpenAI-compatible base URL for /audio/speech")
    p.add_argument("--tts-model", default="tts-1", help="model name for --tts-base-url (default tts-1)")
    p.add_argument("--tts-api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--system-prompt", default=None, help="system prompt for the answers")
    p.add_argument("--max-answer-tokens", type=int, default=128, help="longest answer, tokens (default 128)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="longest spoken answer (default 30)")
    p.add_argument("--text-questions", action="store_true",
                   help="keep questions as user_text instead of speaking them as user_audio")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed request (default 3)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("info", help="load a checkpoint and print its size, load time and peak memory")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="measure time to first audio and real-time factor under concurrent sessions",
                       description="Benchmark the streaming engine. For each concurrency level N, N sessions each "
                                   "stream a turn of synthetic user audio (100 ms chunks), then all N ask for a "
                                   "response at the same moment. Reports TTFT (respond() to first audio chunk), "
                                   "RTF (generation time / audio time; < 1 is faster than real time) and "
                                   "aggregate frames/s, and writes bench.json, bench.md and bench.png to --out. "
                                   "Works with random-weight checkpoints from init-random (they speak noise).")
    _add_model_args(p)
    p.add_argument("--sessions", type=_sessions_list, default=[1, 2, 4], metavar="N,N,...",
                   help="concurrency levels to measure, comma-separated (default: 1,2,4)")
    p.add_argument("--frames", type=int, default=50, metavar="F",
                   help="80 ms frames per response; each response runs to F frames unless the model stops "
                        "(default: 50 = 4 s)")
    p.add_argument("--user-seconds", type=float, default=2.0, metavar="S",
                   help="seconds of synthetic 16 kHz user audio per turn (default: 2)")
    p.add_argument("--turns", type=int, default=2, metavar="T",
                   help="measured rounds (conversation turns) per concurrency level (default: 2)")
    p.add_argument("--warmup", type=int, default=1, metavar="W",
                   help="warm-up rounds per level, not recorded (default: 1)")
    p.add_argument("--out", default="bench-results", metavar="DIR",
                   help="directory for bench.json, bench.md and bench.png (default: bench-results)")
    p.add_argument("--per-frame", type=_int_list, default=None, metavar="SHORT,LONG",
                   help="also time one response alone at SHORT and LONG frames (e.g. 24,200) and report ms per "
                        "frame as their difference (loading and prefill cancel out); eager, and compiled too "
                        "with --compile. --sessions 0 skips the concurrency levels")
    _add_compile_arg(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("loadtest", help="load-test a running server with N realtime clients (TTFT, gaps, underruns)",
                       description="N realtime clients (websockets) stream synthetic speech-like user audio paced in "
                                   "real time, commit and ask for a response, and listen with a playback clock; "
                                   "some barge in (response.cancel) or drop the connection mid-answer. Reports TTFT "
                                   "from the end of speech to the first audio, gaps between audio deltas, playback "
                                   "underruns, cancel latency, errors and refused sessions as loadtest.json, "
                                   "loadtest.md and loadtest.png under --out.")
    p.add_argument("--server", required=True, metavar="URL", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=4, metavar="N", help="concurrent clients (default: 4)")
    p.add_argument("--duration", type=float, default=60.0, metavar="S",
                   help="seconds of load; each client then finishes its turn (default: 60)")
    p.add_argument("--out", default="loadtest-results", metavar="DIR", help="output directory")
    p.add_argument("--api-key", default=os.environ.get("OPENCHROMA_API_KEY"), help="the server's API key")
    p.add_argument("--voice", default=None, help="library voice to answer in (default: the server's default)")
    p.add_argument("--voice-audio", default=None, metavar="FILE",
                   help="register this reference audio first (as --voice, default name 'loadtest')")
    p.add_argument("--voice-text", default=None, metavar="TEXT", help="transcript of --voice-audio")
    p.add_argument("--turn-seconds", type=_range, default=(1.0, 3.0), metavar="LO,HI",
                   help="user speech per turn, drawn uniformly (default: 1,3)")
    p.add_argument("--response-tokens", type=int, default=25, metavar="N",
                   help="max_output_tokens per answer; 2 frames (160 ms) each (default: 25)")
    p.add_argument("--barge-in", type=float, default=0.2, metavar="P", help="chance a turn is interrupted (0.2)")
    p.add_argument("--disconnect", type=float, default=0.05, metavar="P",
                   help="chance a turn ends with the client dropping the connection (0.05)")
    p.add_argument("--jitter-ms", type=float, default=100.0, metavar="MS",
                   help="playback starts this long after the first audio delta (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed for audio and choices (default: 0)")
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser("serve", help="run the real-time voice server (OpenAI Realtime, chat, speech, browser client)",
                       description="Serve one model over HTTP and WebSocket: the OpenAI Realtime protocol at "
                                   "/v1/realtime (server VAD, barge-in, user transcripts; works with Pipecat and "
                                   "LiveKit Agents), /v1/chat/completions and /v1/audio/speech (streaming), "
                                   "/v1/audio/transcriptions, a persistent voice library at /v1/voices, "
                                   "/v1/models, /metrics "
                                   "(Prometheus), /health, and a browser client at /. The model loads in the "
                                   "background; /health answers 503 until it is ready.")
    _add_model_args(p, dtype=None, model=PUBLISHED_MODEL)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("OPENCHROMA_API_KEY"),
                   help="require this key on every API route and the WebSocket (default: $OPENCHROMA_API_KEY; "
                        "unset = no key)")
    p.add_argument("--data-dir", default=str(_default_data_dir()),
                   help=f"where the voice library lives (default: {_default_data_dir()})")
    p.add_argument("--max-sessions", type=int, default=8,
                   help="conversations served at once; more get HTTP 503 / a realtime error (default: 8)")
    p.add_argument("--max-context", type=int, default=4096, help="reasoner context per conversation, tokens")
    p.add_argument("--max-response-seconds", type=float, default=None,
                   help="longest single spoken response (default: 60; 4 for init-random checkpoints)")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="largest HTTP request body (default: 25)")
    p.add_argument("--default-voice", default=None,
                   help="library voice used when a request names none or an OpenAI stock voice (alloy, ...); "
                        "default: the library's only voice, if it has exactly one")
    p.add_argument("--allow-local-audio", action="store_true",
                   help="let chat requests name audio files on the server's disk (the published Chroma "
                        "server's path form); off by default")
    p.add_argument("--model-id", default=None, help="model id reported by /v1/models (default: the model's name)")
    p.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="let web pages on ORIGIN (e.g. https://app.example.com; '*' for any) open the WebSocket and "
                        "POST; repeat for several. Default: only the server's own origin and non-browser clients")
    p.add_argument("--idle-timeout", type=float, default=300.0, metavar="S",
                   help="close a realtime session after S seconds with no client event and no response "
                        "(close code 4000; 0 = never; default: 300)")
    p.add_argument("--max-sessions-per-client", type=int, default=0, metavar="N",
                   help="sessions one client address may hold at once; more get HTTP 429 / a realtime error "
                        "(default: 0 = no cap)")
    p.add_argument("--send-timeout", type=float, default=15.0, metavar="S",
                   help="drop a realtime client that reads nothing for S seconds while the server has events for "
                        "it (close code 1008; default: 15)")
    p.add_argument("--max-text-chars", type=int, default=16000, metavar="N",
                   help="longest text item, message, instructions or prompt text (default: 16000); the texts of "
                        "one chat request together get 4x this")
    _add_compile_arg(p)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the frame step as CUDA graphs at load, one per batch size (default: on with CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the frame loop (default: 1 for small models, whose tiny ops lose more to "
                        "thread hand-offs than they gain; torch's default for models 1024 wide or more)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="measure SIM, WER, TTFT and RTF over a test list (the paper's measurements)",
                       description="Speak every utterance of a seed-tts-eval test list in the voice of its prompt "
                                   "through the streaming engine (--model), or take existing audio files named "
                                   "<utt>.wav (--audio-dir), and score them: SIM (speaker-verification cosine "
                                   "similarity of output and prompt), WER (speech recognition of the output against "
                                   "the text), TTFT and RTF as a client of the engine sees them. Writes "
                                   "results.json, report.md (with the paper's figures) and PNG plots to --out. "
                                   "A random-weight checkpoint speaks noise: its SIM and WER mean nothing.",
                       epilog="List format (paths relative to the list; '#' comments): tts: "
                              "utt|prompt_text|prompt_wav|target_text; dialogue: utt|prompt_text|prompt_wav|user_wav.")
    p.add_argument("--model", default=None, help=COMMON_MODEL_HELP + "; omit with --audio-dir")
    p.add_argument("--device", default=None, help="cpu, cuda, ... for the model (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype (default: float32)")
    p.add_argument("--list", required=True, metavar="FILE", help="the test list (see the format below)")
    p.add_argument("--task", default="tts", choices=["tts", "dialogue"],
                   help="tts: speak target_text (forced text); dialogue: answer user_wav, whose answer text is "
                        "the WER reference (default: tts)")
    p.add_argument("--audio-dir", default=None, metavar="DIR",
                   help="score existing audio <utt>.wav (.flac/.ogg/.mp3) instead of synthesising; for dialogue, "
                        "<utt>.txt holds the answer's text")
    p.add_argument("--out", required=True, metavar="DIR", help="where results.json, report.md, plots and audio go")
    p.add_argument("--sim-model", default="auto", metavar="NAME",
                   help="auto (WavLM speaker verification if its weights load, else resemblyzer), wavlm, "
                        "resemblyzer (offline), or a transformers x-vector model id/directory (default: auto)")
    p.add_argument("--asr-model", default="auto", metavar="NAME",
                   help="auto (Whisper-large-v3 if its weights load, else pocketsphinx), whisper, pocketsphinx "
                        "(offline), or a transformers Whisper model id/directory (default: auto)")
    p.add_argument("--max-frames", type=int, default=750,
                   help="at most this many 80 ms frames per utterance (default 750 = 60 s)")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up responses before timing (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("listen", help="blind A/B listening test in the browser (NCMOS/SCMOS preferences)",
                       description="Serve a listening page: each trial plays a reference clip and two systems' "
                                   "clips in random order, without names, and asks which sounds more natural "
                                   "(NCMOS) or more like the reference speaker (SCMOS). Answers go to "
                                   "DIR/answers.sqlite. --summary DIR prints preference percentages with 95% "
                                   "confidence intervals (Wilson).",
                       epilog="Pairs format (paths relative to the file; '#' comments): "
                              "item|reference_wav|system_a|wav_a|system_b|wav_b")
    p.add_argument("--pairs", default=None, metavar="FILE", help="the trials to run")
    p.add_argument("--out", default=None, metavar="DIR", help="where answers.sqlite goes")
    p.add_argument("--questions", default="ncmos,scmos",
                   help="comma-separated: ncmos (naturalness), scmos (speaker similarity) (default: both)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 picks a free one)")
    p.add_argument("--seed", type=int, default=None, help="seed for the clip order (default: random)")
    p.add_argument("--summary", default=None, metavar="DIR",
                   help="print the preferences recorded in DIR/answers.sqlite and exit")
    p.add_argument("--json", action="store_true", help="with --summary: print JSON")
    p.set_defaults(func=cmd_listen)

    return parser


def _default_data_dir():
    from .serving import default_data_dir

    return default_data_dir()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .audio import AudioError
    from .loading import CheckpointError
    from .tools.conformance import CaseError

    try:
        return int(args.func(args) or 0)
    except (CheckpointError, CaseError, AudioError, ValueError) as e:
        print(f"openchroma {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

