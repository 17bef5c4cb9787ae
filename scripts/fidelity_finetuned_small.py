"""Fidelity of int8 and int4 on a fine-tuned `small` model, whose Backbone and Decoder logits are confident (random
weights give flat logits, on which top-1 agreement measures noise).

    python scripts/fidelity_finetuned_small.py --work /tmp/fid-small [--steps 150]

1. `init-random --preset small`; a few synthetic examples (tones, as the training tests make); `prepare`; full
   fine-tuning of the Backbone and Decoder until the loss is low (the Reasoner stays random: its text logits stay
   flat, so read the text columns as noise);
2. reference cases from the fine-tuned model in float32: the training prompts, greedy codes with the target text;
3. `openchroma fidelity` in int8 and int4, with bf16 beside.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_cases(model: Path, manifest: Path, prepared: Path, out: Path) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    import openchroma
    from openchroma.training.data import PreparedDataset

    chroma = openchroma.Chroma.from_pretrained(model, device="cpu", progress=False)
    ds = PreparedDataset(prepared)
    paths = []
    for i, line in enumerate(manifest.read_text().splitlines()):
        row = json.loads(line)
        voice = chroma.voice(manifest.parent / row["voice_audio"], row["voice_text"])
        system = openchroma.pipeline.DEFAULT_SYSTEM_PROMPT
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
                    {"role": "user", "content": [{"type": "text", "text": row["user_text"]}]}]
        ids = chroma.prompt_ids(messages)
        target = ds.tensors(i)
        result = openchroma.generate(chroma.model, ids, voice, max_new_frames=target["codes"].shape[0],
                                     forced_text_tokens=target["text_ids"].tolist(), decode_audio=False)
        case = {"thinker_input_ids": torch.as_tensor(ids).reshape(1, -1), "prompt_text_ids": voice.text_ids,
                "prompt_codes": voice.codes, "prompt_audio": torch.zeros(1),
                "expected_codes": result.codes, "expected_text_tokens": torch.tensor(result.text_tokens),
                "expected_prefill_logits": result.prefill_logits, "expected_audio": torch.zeros(1)}
        paths.append(out / f"case_finetuned_{i}.safetensors")
        save_file({k: v.contiguous() for k, v in case.items()}, paths[-1])
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rows", type=int, default=4)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from training_helpers import write_dataset

    from openchroma.cli import main as cli
    from openchroma.tools import fidelity
    from openchroma.tools.init_random import write_random_checkpoint

    work = args.work
    base, tuned, data = work / "small", work / "small-tuned", work / "data"
    if not (base / "config.json").is_file():
        write_random_checkpoint("small", base, seed=0, progress=False)
    manifest = write_dataset(data, rows=args.rows, response_seconds=2.0)
    prepared = data / "prepared"
    if not prepared.is_dir():
        assert cli(["prepare", "--model", str(base), "--data", str(manifest), "--out", str(prepared)]) == 0
    if not (tuned / "config.json").is_file():
        assert cli(["train", "--model", str(base), "--data", str(prepared), "--out", str(tuned), "--no-progress",
                    "--no-tensorboard", "--steps", str(args.steps), "--lr", "3e-3", "--warmup", "10",
                    "--batch-size", "2"]) == 0
    metrics = [json.loads(x) for x in (tuned / "metrics.jsonl").read_text().splitlines()]
    print(f"training loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f} in {len(metrics)} steps")
    cases = make_cases(tuned, manifest, prepared, work)
    rows = []
    for q in ("int8", "int4"):
        rows += fidelity.measure(str(tuned), cases, quantize=q, device="cpu", yardstick=q == "int8")
    print(fidelity.table(rows))
    (work / "fidelity.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
