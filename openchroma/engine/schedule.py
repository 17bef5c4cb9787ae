"""The arithmetic of Chroma's 1:2 schedule, in one place.

A response is a sequence of 80 ms frames. The backbone's input is the voice prompt, then:

* step 0: the first text pair ``H(0) E(0)`` (the reasoner's hidden state that produced text token 0, and
  that token's embedding);
* step ``s >= 1``: ``A(frame s-1)``, followed on even ``s`` by the pair ``H(s/2) E(s/2)`` while text remains.

The backbone's hidden state after the last vector of step ``s`` predicts codebook 0 of frame ``s``. The
text ends with ``im_end``; its pair is the last one fed. Everything that needs these rules — the engine's
planner, cache budgets, training's teacher-forced sequences — takes them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..constants import FRAME_RATE_HZ, FRAME_SECONDS

__all__ = ["DEFAULT_MAX_FRAMES", "FRAME_SECONDS", "FRAMES_PER_TEXT_TOKEN", "frames_for_seconds", "frames_heard",
           "frames_for_text", "seconds_of_frames"]

#: Frames a response may run by default: 60 s of speech.
DEFAULT_MAX_FRAMES = 750
#: Frames per text token: one text pair enters the backbone every second frame.
FRAMES_PER_TEXT_TOKEN = 2


def frames_for_seconds(seconds: float) -> int:
    return int(round(seconds * FRAME_RATE_HZ))


def seconds_of_frames(frames: int) -> float:
    """Seconds of audio in ``frames`` frames (80 ms each)."""
    return frames * FRAME_SECONDS


def frames_heard(audio_ms: float) -> int:
    """Whole frames played within the first ``audio_ms`` milliseconds."""
    return max(0, int(audio_ms // (1000 * FRAME_SECONDS)))


def frames_for_text(text_tokens: int) -> int:
    """Frames that carry ``text_tokens`` text tokens into the speech (the schedule feeds one every two frames)."""
    return FRAMES_PER_TEXT_TOKEN * text_tokens


def pair_index_at(step: int) -> int | None:
    """Which text pair (if any) may enter the backbone at ``step``: pair ``j`` enters at step ``2j``."""
    return step // 2 if step % 2 == 0 else None


def backbone_vectors_at(step: int, with_pair: bool) -> int:
    """How many vectors the backbone consumes at ``step`` (2 at step 0; 1, or 3 with a text pair, after)."""
    if step == 0:
        return 2
    return 3 if with_pair else 1


def max_text_pairs(max_frames: int) -> int:
    """Text tokens that can enter the backbone within ``max_frames`` frames (steps 0, 2, 4, ...)."""
    return (max_frames - 1) // 2 + 1


def backbone_budget(voice_len: int, max_frames: int) -> int:
    """Backbone positions one response may use: the voice prompt plus at most 2 per frame."""
    return voice_len + 2 + (max_frames - 1) + 2 * ((max_frames - 1) // 2)


def reasoner_budget(prompt_len: int, max_frames: int, lookahead: int) -> int:
    """Reasoner positions one response may use: the prompt, then one per text token it consumes."""
    return prompt_len + max_text_pairs(max_frames) + lookahead


def frames_within(backbone_positions: int, voice_len: int) -> int:
    """The most frames a response can run when the backbone has ``backbone_positions`` positions in all."""
    free = backbone_positions - voice_len - 2
    if free < 0:
        return 0
    # Each pair of frames after the first takes 1 + 3 positions: A, then A H E.
    frames = 1 + (free // 4) * 2
    if free % 4 >= 1:
        frames += 1
    return frames


Entry = tuple[Literal["H", "E", "A"], int]


@dataclass(frozen=True)
class ResponseLayout:
    """The backbone's input for one response after the voice prompt, entry by entry.

    ``entries[i]`` is ``("H", j)`` (the reasoner hidden state of text token ``j``), ``("E", j)`` (text token
    ``j``'s embedding) or ``("A", f)`` (the summed code embeddings of frame ``f``). ``predicts[s]`` is the index
    in ``entries`` whose backbone output predicts frame ``s``'s codebook 0.
    """

    entries: tuple[Entry, ...]
    predicts: tuple[int, ...]


def response_layout(n_text: int, n_frames: int) -> ResponseLayout:
    """The entries of a response of ``n_text`` text tokens (the last one ``im_end``) and ``n_frames`` frames.

    Training builds its teacher-forced sequence from this, the engine's planner follows the same rules step
    by step (a test checks that they agree). Text that the frames cannot carry is not fed.
    """
    if n_text < 1 or n_frames < 1:
        raise ValueError("a response has at least one text token and one frame")
    entries: list[Entry] = [("H", 0), ("E", 0)]
    predicts = [1]
    for s in range(1, n_frames):
        entries.append(("A", s - 1))
        j = pair_index_at(s)
        if j is not None and j < n_text:
            entries += [("H", j), ("E", j)]
        predicts.append(len(entries) - 1)
    return ResponseLayout(tuple(entries), tuple(predicts))
