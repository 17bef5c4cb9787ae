"""``openchroma prepare``: run the frozen parts once over a manifest.

Per example: Mimi codes of the voice and of the response audio, the voice transcript's and the response's
token ids, and the reasoner's hidden states for the response given the question (teacher-forced on
``response_text``). Written as safetensors shards of ``--shard-size`` examples plus ``prepared.json``; a
shard is written whole or not at all, so an interrupted run resumes at the first missing shard.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..audio import AudioError, load_audio, log_mel_features
from ..cli_args import add_model_arguments
from ..constants import CODEC_SAMPLE_RATE, REASONER_SAMPLE_RATE
from ..engine.schedule import backbone_budget, max_text_pairs
from ..loading import LoadedModel, load
from ..models.audio_encoder import audio_token_count
from ..tokenizer import ChatTokenizer, build_chat_prompt, system_message
from ..voice import encode_voice
from .data import (
    PREPARED_FORMAT,
    PREPARED_INDEX,
    ManifestError,
    ManifestRow,
    decode_line,
    read_manifest_lines,
)
from .sequence import reasoner_response_hidden

MAX_VOICE_SECONDS = 30.0
MAX_USER_SECONDS = 30.0


@dataclass
class PrepareLimits:
    """What a row may hold: longer audio is a bad row (the context could not carry it)."""

    max_voice_seconds: float = MAX_VOICE_SECONDS
    max_user_seconds: float = MAX_USER_SECONDS
    max_response_seconds: float = 60.0


class Preparer:
    """Turns manifest rows into training tensors with one loaded model."""

    def __init__(self, lm: LoadedModel, tokenizer: ChatTokenizer, limits: PrepareLimits | None = None):
        self.lm = lm
        self.model = lm.model
        self.cfg = lm.config
        self.tokenizer = tokenizer
        self.limits = limits or PrepareLimits()

    def prompt_ids(self, row: ManifestRow, n_audio_tokens: int | None) -> list[int]:
        content: list[dict] = []
        if n_audio_tokens is not None:
            content.append({"type": "audio"})
        if row.user_text:
            content.append({"type": "text", "text": row.user_text})
        messages = [system_message(row.system or None), {"role": "user", "content": content}]
        return build_chat_prompt(self.tokenizer, messages, [] if n_audio_tokens is None else [n_audio_tokens])

    def _audio(self, row: ManifestRow, key: str, rate: int, limit: float) -> torch.Tensor:
        path = getattr(row, key)
        try:
            return load_audio(path, rate, max_seconds=limit)
        except AudioError as e:
            raise ManifestError(row.where, f"{key}: {e}") from None

    @torch.inference_mode()
    def example(self, row: ManifestRow) -> dict[str, torch.Tensor]:
        """The tensors of one row; raises :class:`ManifestError` naming the row when it cannot be used."""
        m, cfg, lim = self.model, self.cfg, self.limits
        voice_ids = self.tokenizer.encode(row.voice_text)
        voice = encode_voice(m, self._audio(row, "voice_audio", CODEC_SAMPLE_RATE, lim.max_voice_seconds), voice_ids)
        resp_wav = self._audio(row, "response_audio", CODEC_SAMPLE_RATE, lim.max_response_seconds)
        p = next(m.codec_model.parameters())
        codes = m.codec_model.encode(resp_wav.to(p.device, p.dtype).reshape(1, -1))[0, : cfg.audio_num_codebooks].T
        n_frames = int(codes.shape[0]) + 1  # + the end-of-audio frame
        response_ids = self.tokenizer.encode(row.response_text) + [cfg.im_end_token_id]
        n_text = len(response_ids)
        if n_text > max_text_pairs(n_frames):
            raise ManifestError(row.where, f"response_text is {n_text} tokens (with im_end) but the response audio "
                                           f"({n_frames - 1} frames) carries at most {max_text_pairs(n_frames)} "
                                           "at the 1:2 schedule (one token per two 80 ms frames): the audio is "
                                           "too short for the text")
        bb_len = voice.text_ids.numel() + 2 + voice.codes.shape[0] + 1 + backbone_budget(0, n_frames)
        if bb_len > cfg.backbone.max_position_embeddings:
            raise ManifestError(row.where, f"voice prompt + response need {bb_len} backbone positions, more than "
                                           f"the context of {cfg.backbone.max_position_embeddings}: the audio is "
                                           "too long")
        audio_embeds = None
        n_audio = None
        if row.user_audio is not None:
            wav = self._audio(row, "user_audio", REASONER_SAMPLE_RATE, lim.max_user_seconds)
            feats = log_mel_features(wav)
            n_audio = audio_token_count(feats.shape[-1])
            mel = feats.to(self.lm.device, self.lm.dtype).reshape(feats.shape[-2], -1)
            audio_embeds = m.thinker.audio_tower(mel)
        prompt = self.prompt_ids(row, n_audio)
        if len(prompt) + n_text > cfg.reasoner.max_position_embeddings:
            raise ManifestError(row.where, f"question + response are {len(prompt) + n_text} reasoner tokens, more "
                                           f"than its context of {cfg.reasoner.max_position_embeddings}")
        hidden = reasoner_response_hidden(m, torch.tensor(prompt), torch.tensor(response_ids), audio_embeds)
        return {
            "voice_text_ids": voice.text_ids.to(torch.int64).cpu().contiguous(),
            "voice_codes": voice.codes.to(torch.int64).cpu().contiguous(),
            "hidden": hidden.float().cpu().contiguous(),
            "text_ids": torch.tensor(response_ids, dtype=torch.int64),
            "codes": codes.to(torch.int64).cpu().contiguous(),
        }


def prepare(
    model: str | os.PathLike | LoadedModel,
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    skip_bad: bool = False,
    shard_size: int = 256,
    device: str | None = None,
    dtype: str = "float32",
    limits: PrepareLimits | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Prepare ``manifest`` into ``out``; returns the ``prepared.json`` contents.

    Bad rows raise :class:`ManifestError` (naming the row) unless ``skip_bad``, which skips and counts them.
    Resumes: shards already written are kept.
    """
    manifest = Path(manifest).resolve()
    out = Path(out)
    lines = read_manifest_lines(manifest)
    lm = model if isinstance(model, LoadedModel) else load(model, device=device, dtype=dtype, progress=progress)
    tokenizer = ChatTokenizer.from_dir(lm.path)
    preparer = Preparer(lm, tokenizer, limits)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / PREPARED_INDEX
    meta = _resume_meta(index_path, {
        "format": PREPARED_FORMAT, "model": str(lm.path), "manifest": str(manifest),
        "hidden_size": lm.config.reasoner.hidden_size, "shard_size": shard_size, "rows": len(lines),
        "complete": False, "shards": []})
    done = {s["index"] for s in meta["shards"]}
    n_shards = (len(lines) + shard_size - 1) // shard_size
    with tqdm(total=len(lines), desc="Preparing", unit="example", disable=not progress) as bar:
        bar.update(sum(len(s["examples"]) + len(s["skipped"]) for s in meta["shards"]))
        for k in range(n_shards):
            if k in done:
                continue
            shard = _write_shard(preparer, manifest, lines[k * shard_size:(k + 1) * shard_size], out, k, skip_bad,
                                 bar.update)
            meta["shards"].append(shard)
            meta["shards"].sort(key=lambda s: s["index"])
            _write_json(index_path, meta)
    meta["complete"] = True
    meta["examples"] = sum(len(s["examples"]) for s in meta["shards"])
    meta["skipped"] = sum(len(s["skipped"]) for s in meta["shards"])
    _write_json(index_path, meta)
    if meta["skipped"]:
        log(f"skipped {meta['skipped']} bad row(s) of {len(lines)}:")
        for s in meta["shards"]:
            for b in s["skipped"]:
                log(f"  {b['error']}")
    if not meta["examples"]:
        raise ValueError(f"{manifest}: no usable example")
    return meta


def _resume_meta(index_path: Path, meta: dict) -> dict:
    """``meta`` with the shards an earlier run of the same preparation left in ``index_path``'s folder."""
    if not index_path.is_file():
        return meta
    old = json.loads(index_path.read_text())
    same = all(old.get(k) == meta[k] for k in ("format", "manifest", "shard_size", "rows", "hidden_size"))
    if not same:
        raise ValueError(f"{index_path.parent}: holds a preparation of another manifest or model/shard settings; "
                         "use an empty --out directory")
    meta["shards"] = [s for s in old["shards"] if (index_path.parent / s["file"]).is_file()]
    return meta


def _write_shard(preparer: Preparer, manifest: Path, lines: list, out: Path, k: int, skip_bad: bool,
                 advance: Callable[[], object]) -> dict:
    """Prepare ``lines`` into shard ``k`` (written whole, or not at all); the shard's index entry."""
    tensors: dict[str, torch.Tensor] = {}
    examples: list[dict] = []
    skipped: list[dict] = []
    for line, text in lines:
        try:
            ex = preparer.example(decode_line(manifest, line, text))
        except ManifestError as e:
            if not skip_bad:
                raise
            skipped.append({"line": line, "error": str(e)})
            advance()
            continue
        j = len(examples)
        for key, t in ex.items():
            tensors[f"{j}.{key}"] = t
        examples.append({"line": line, "n_text": int(ex["text_ids"].numel()), "n_frames": int(ex["codes"].shape[0]),
                         "voice_frames": int(ex["voice_codes"].shape[0])})
        advance()
    file = f"shard-{k:05d}.safetensors"
    tmp = out / (file + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": PREPARED_FORMAT})
    tmp.replace(out / file)
    return {"index": k, "file": file, "examples": examples, "skipped": skipped}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """What ``prepare`` and ``train`` (which prepares a manifest first) share."""
    p.add_argument("--max-response-seconds", type=float, default=60.0,
                   help="longest response audio accepted; longer rows are bad rows (default 60)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Read a JSONL manifest (one example a line: voice_audio, voice_text, user_audio and/or "
                     "user_text, response_text, response_audio; paths relative to the manifest) and store, per "
                     "example, the Mimi codes of the voice and the response, and the reasoner's hidden states and "
                     "token ids of the response given the question (teacher-forced on response_text), as "
                     "safetensors shards in --out. Resumable: run it again to continue. A bad row (missing or "
                     "unreadable audio, empty text, audio too long, response text longer than the audio carries at "
                     "one token per two frames) stops with an error naming the row, unless --skip-bad.")
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="the manifest (.jsonl)")
    p.add_argument("--out", required=True, help="directory for the prepared shards")
    p.add_argument("--skip-bad", action="store_true", help="skip bad rows (and report how many) instead of stopping")
    p.add_argument("--shard-size", type=int, default=256, help="examples per shard (default 256)")
    add_prepare_arguments(p)


def run(args: argparse.Namespace) -> int:
    meta = prepare(args.model, args.data, args.out, skip_bad=args.skip_bad, shard_size=args.shard_size,
                   device=args.device, dtype=args.dtype,
                   limits=PrepareLimits(max_response_seconds=args.max_response_seconds))
    print(json.dumps({"out": args.out, "examples": meta["examples"], "skipped": meta["skipped"]}))
    return 0
