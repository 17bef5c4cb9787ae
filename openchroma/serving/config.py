"""The server's configuration: one dataclass, light to import (``openchroma serve --help`` builds its flags from it
without loading FastAPI or torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..constants import FRAME_RATE_HZ
from . import default_data_dir


def flag(help: str, **cli) -> dict:
    """A ``ServerConfig`` field's metadata for ``openchroma serve`` (which makes every field a flag): ``help``;
    ``name`` (the flag without ``--``, if not the field's name), ``scale`` (the flag's unit is the field's
    divided by this, e.g. MiB for bytes), ``metavar``."""
    return {"help": help, **cli}


@dataclass
class ServerConfig:
    """How the server runs. ``openchroma serve`` has one flag per field (``--max-sessions`` for
    ``max_sessions``, with the help in the field's metadata), so a default is written only here."""

    model: str = ""
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None   # int8, int4 or fp8 weights (the shared model flags add --quantize)
    api_key: str | None = field(default=None, metadata=flag(
        "require this key on every API route and the WebSocket (default: $OPENCHROMA_API_KEY; unset = no key)"))
    data_dir: Path = field(default_factory=default_data_dir, metadata=flag("where the voice library lives"))
    voices_db: str | None = field(default=None, metadata=flag(
        "keep the voice library in PostgreSQL (postgresql://USER:PASSWORD@HOST/DB) instead of --data-dir, shared "
        "by every replica", metavar="URL"))
    max_sessions: int = field(default=8, metadata=flag(
        "conversations served at once; more get HTTP 503 / a realtime error"))
    max_context: int = field(default=4096, metadata=flag("reasoner context per conversation, tokens"))
    max_response_seconds: float = field(default=60.0, metadata=flag(
        "longest single spoken response, seconds; 4 for init-random checkpoints unless given"))
    max_upload_bytes: int = field(default=25 * 1024 * 1024, metadata=flag(
        "largest HTTP request body (voice uploads, chat requests with audio), MiB", name="max-upload-mb",
        scale=2**20))
    max_ws_message_bytes: int = field(default=8 * 1024 * 1024, metadata=flag(
        "largest realtime event, MiB", name="max-ws-message-mb", scale=2**20))
    max_input_audio_seconds: float = field(default=120.0, metadata=flag("longest user turn of audio, seconds"))
    default_voice: str | None = field(default=None, metadata=flag(
        "library voice used when a request names none or an OpenAI stock voice (alloy, ...); default: the "
        "library's only voice, if it has exactly one"))
    allow_local_audio: bool = field(default=False, metadata=flag(
        "let chat requests name audio files on the server's disk as file:// URLs"))
    model_id: str = field(default="chroma-4b", metadata=flag(
        "model id reported by /v1/models (default: the model's name)"))
    compile: bool = field(default=False, metadata=flag(
        "compile the frame step with torch.compile (inductor) before the first response; takes a minute or more "
        "per batch size at load (on a GPU the step is also captured as CUDA graphs)"))
    cuda_graphs: bool | None = field(default=None, metadata=flag(
        "capture the frame step as CUDA graphs at load, one per batch size (default: on with CUDA)"))
    threads: int | None = field(default=None, metadata=flag(
        "CPU threads of the frame loop (default: 1 for small models, whose tiny ops lose more to thread hand-offs "
        "than they gain; torch's default for models 1024 wide or more)"))
    turn_model: str | None = field(default=None, metadata=flag(
        "semantic_vad's end-of-turn model: the path of smart-turn-v3.2-cpu.onnx (or a directory holding it), or a "
        "hub id; default: the copy in the installed pipecat-ai package", metavar="PATH"))
    twilio_auth_token: str | None = field(default=None, metadata=flag(
        "check X-Twilio-Signature with this Twilio auth token on POST /twilio/voice and the /twilio/media-stream "
        "handshake (wrong or missing: 403); unset = anyone who reaches the server can start a call",
        metavar="TOKEN"))
    twilio_voice: str | None = field(default=None, metadata=flag(
        "library voice for phone calls (/twilio/voice) that name none (default: --default-voice)", metavar="NAME"))
    twilio_instructions: str | None = field(default=None, metadata=flag(
        "instructions for phone calls that give none (default: the model's system prompt)", metavar="TEXT"))
    # Abuse and fault limits: one client must never hurt another.
    allow_origins: tuple[str, ...] = field(default=(), metadata=flag(
        "let web pages on ORIGIN (e.g. https://app.example.com; '*' for any) open the WebSocket and POST; repeat "
        "for several. Default: only the server's own origin and non-browser clients", name="allow-origin",
        metavar="ORIGIN"))
    ice_servers: tuple[str, ...] = field(default=(), metadata=flag(
        "a STUN or TURN server WebRTC calls gather candidates with, as a URL: stun:HOST:PORT, or "
        "turn:USER:PASSWORD@HOST:PORT (turns: for TLS); repeat for several. Default: none (host candidates only, "
        "for clients on the same network)", name="ice-server", metavar="URL"))
    idle_timeout: float = field(default=300.0, metadata=flag(
        "close a realtime session after S seconds with no client event and no response (close code 4000; "
        "0 = never)", metavar="S"))
    max_sessions_per_client: int = field(default=0, metadata=flag(
        "sessions one client address may hold at once; more get HTTP 429 / a realtime error (0 = no cap)",
        metavar="N"))
    send_timeout: float = field(default=15.0, metadata=flag(
        "drop a realtime client that reads nothing for S seconds while the server has events for it "
        "(close code 1008)", metavar="S"))
    engine_timeout: float = field(default=120.0, metadata=flag(
        "an engine call that takes longer than S seconds fails with an error (0 = wait forever)", metavar="S"))
    max_text_chars: int = field(default=16000, metadata=flag(
        "longest text item, message, instructions or prompt text; the texts of one chat request together get 4x "
        "this", metavar="N"))
    max_pending_input_bytes: int = field(default=16 * 2**20, metadata=flag(
        "decoded audio a realtime connection may queue unprocessed, MiB", name="max-pending-input-mb", scale=2**20))
    max_messages: int = field(default=256, metadata=flag("messages in one chat request", metavar="N"))
    max_conversation_items: int = field(default=1000, metadata=flag(
        "items one conversation may hold; more get an error event (conversation_item_limit_reached)",
        metavar="N"))
    shutdown_grace: float = field(default=10.0, metadata=flag(
        "on SIGTERM, let running responses finish for up to S seconds, then end realtime sessions (close 1001) and "
        "SSE streams ([DONE])", metavar="S"))
    header_timeout: float = field(default=5.0, metadata=flag(
        "close a new connection that has not sent its request headers within S seconds", metavar="S"))
    ws_ping_interval: float = field(default=20.0, metadata=flag(
        "WebSocket keepalive ping every S seconds (0 = none)", metavar="S"))
    ws_ping_timeout: float = field(default=20.0, metadata=flag(
        "close a WebSocket whose ping is unanswered for S seconds; a realtime client held in back-pressure is closed "
        "(1013) after 3/4 of this", metavar="S"))

    # Scale-out on Ray Serve (``serving/ray_app``): any of these makes ``serve`` start or join a Ray cluster.
    replicas: int = field(default=0, metadata=flag(
        "serve N engine replicas behind one endpoint with Ray Serve (0 = one process, no Ray)", metavar="N"))
    min_replicas: int | None = field(default=None, metadata=flag(
        "autoscale on live sessions between --min-replicas and --max-replicas (Ray Serve)", metavar="N"))
    max_replicas: int | None = field(default=None, metadata=flag(
        "autoscaling's upper bound (Ray Serve)", metavar="N"))
    ray_address: str | None = field(default=None, metadata=flag(
        "join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local one", metavar="ADDR"))
    replica_cpus: float = field(default=1.0, metadata=flag(
        "CPUs Ray reserves per replica (fractions allowed)", metavar="N"))
    drain_seconds: float = field(default=30.0, metadata=flag(
        "on scale-down or upgrade, how long a replica's live sessions may run on before it exits", metavar="S"))

    @property
    def scale_out(self) -> bool:
        """Whether ``serve`` runs on Ray Serve."""
        return bool(self.replicas or self.min_replicas or self.max_replicas or self.ray_address)

    @property
    def max_response_frames(self) -> int:
        return max(1, int(self.max_response_seconds * FRAME_RATE_HZ))

    @property
    def backpressure_timeout(self) -> float:
        """How long a realtime client may be held back (its events not read because the engine is behind) before
        it is closed with a reason that says so: shorter than the keepalive's ping timeout, whose pongs are not read
        meanwhile either (it would close with an unhelpful 1011 "keepalive ping timeout")."""
        return 0.75 * self.ws_ping_timeout if self.ws_ping_timeout > 0 else 0.0

    @property
    def ws_protocol_max_bytes(self) -> int:
        """Messages up to this size are read and answered with an error event; larger ones close with 1009."""
        return 2 * self.max_ws_message_bytes
