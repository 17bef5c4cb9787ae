"""Real (synthetic) speech for checking the metrics: eSpeak NG voices saying known sentences.

``python -m openchroma.eval.espeak DIR`` writes a seed-tts-eval list whose prompts and "system outputs" are
espeak-ng clips: each utterance's output is the prompt's voice saying the target text, so scoring it with
``openchroma eval --audio-dir`` shows what SIM and WER look like on intelligible speech of a known speaker, and
two more lists over the same files show how they move when the speaker or the text is wrong.
Needs the ``espeak-ng`` program (Debian: ``apt-get install espeak-ng``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

ESPEAK_RATE = 16000
# Voices that differ audibly (pitch, formants, accent) and that PocketSphinx recognises tolerably.
VOICES = ("en-us+f2", "en-us+klatt2", "en-us+m3", "en-gb-scotland+f4")
SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "The weather is going to be sunny and warm tomorrow afternoon.",
    "I would like to book a table for two people at seven tonight.",
    "She opened the window and listened to the birds singing in the garden.",
    "Our train leaves the station at nine and arrives in the city before noon.",
)
PROMPT_TEXT = "This is a short recording of my voice, made so that it can be cloned."


class EspeakMissing(RuntimeError):
    pass


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, voice: str, words_per_minute: int = 150) -> np.ndarray:
    """``text`` spoken by espeak-ng ``voice``, float32 mono at ESPEAK_RATE."""
    import soundfile as sf

    from ..audio import load_audio

    if not espeak_available():
        raise EspeakMissing("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "say.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-w", str(wav), text],
                       check=True, capture_output=True)
        audio, rate = sf.read(str(wav), dtype="float32")
    return load_audio(audio, ESPEAK_RATE, source_rate=rate).numpy()


def write_wav(path: Path, audio: np.ndarray, rate: int = ESPEAK_RATE) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, subtype="PCM_16")
    return path


def make_espeak_set(out_dir: str | Path, voices: tuple[str, ...] = VOICES,
                    sentences: tuple[str, ...] = SENTENCES) -> Path:
    """Write prompts/, outputs/ and three lists over the same outputs. In ``list.txt``, utterance ``voice<v>-<i>``
    has voice v saying PROMPT_TEXT as its prompt and voice v saying sentence i as its output (outputs/<utt>.wav):
    what a perfect voice clone would produce. ``list-other-voice.txt`` gives each output the next voice's prompt
    (SIM should drop); ``list-other-text.txt`` gives it another sentence as target text (WER should rise).
    Returns the path of ``list.txt``."""
    out = Path(out_dir)
    lists: dict[str, list[str]] = {"list.txt": [], "list-other-voice.txt": [], "list-other-text.txt": []}
    for v, voice in enumerate(voices):
        write_wav(out / "prompts" / f"voice{v}.wav", speak(PROMPT_TEXT, voice))
        for i, sentence in enumerate(sentences):
            utt = f"voice{v}-{i}"
            write_wav(out / "outputs" / f"{utt}.wav", speak(sentence, voice))
            other_text = sentences[(i + len(sentences) // 2) % len(sentences)]
            lists["list.txt"].append(f"{utt}|{PROMPT_TEXT}|prompts/voice{v}.wav|{sentence}")
            lists["list-other-voice.txt"].append(
                f"{utt}|{PROMPT_TEXT}|prompts/voice{(v + 1) % len(voices)}.wav|{sentence}")
            lists["list-other-text.txt"].append(f"{utt}|{PROMPT_TEXT}|prompts/voice{v}.wav|{other_text}")
    header = "# espeak-ng voices: " + ", ".join(voices) + "\n"
    for name, lines in lists.items():
        (out / name).write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    return out / "list.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openchroma.eval.espeak",
                                     description="Write an espeak-ng test set (list.txt, prompts/, outputs/) for "
                                                 "checking SIM and WER on intelligible speech.")
    parser.add_argument("out", help="output directory")
    args = parser.parse_args(argv)
    path = make_espeak_set(args.out)
    print(f"wrote {path} (and list-other-voice.txt, list-other-text.txt beside it); score it with:\n"
          f"  openchroma eval --list {path} --audio-dir {Path(args.out) / 'outputs'} --out eval-espeak")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
