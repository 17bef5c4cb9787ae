"""A server over int8 weights: a whole realtime turn through the official ``openai`` SDK."""

from __future__ import annotations

import base64

from openai import OpenAI
from server_harness import chroma_server
from test_serve_realtime import CHUNK, add_voice, manual_session, speech24, until  # noqa: F401 (fixture)

from openchroma.loading import load
from openchroma.pipeline import Chroma
from openchroma.serving.codecs import float_to_pcm16
from openchroma.tokenizer import ChatTokenizer


def test_sdk_turn_against_an_int8_server(tiny_random_dir, tmp_path, speech24):  # noqa: F811
    chroma = Chroma(load(tiny_random_dir, device="cpu", quantize="int8", progress=False),
                    ChatTokenizer.from_dir(tiny_random_dir))
    with chroma_server(chroma, tmp_path, max_response_seconds=1.6) as (url, state):
        assert state.engine.model.thinker.model.embed_tokens.__class__.__name__ == "QuantEmbedding"
        add_voice(url)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        with client.realtime.connect(model="chroma-tiny-int8") as conn:
            until(conn, "session.created")
            conn.session.update(session=manual_session())
            until(conn, "session.updated")
            for i in range(0, len(speech24), CHUNK):
                conn.input_audio_buffer.append(audio=base64.b64encode(float_to_pcm16(speech24[i:i + CHUNK])).decode())
            conn.input_audio_buffer.commit()
            until(conn, "input_audio_buffer.committed")
            conn.response.create()
            events: list = []
            done = until(conn, "response.done", events)
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    assert done.response.status in ("completed", "incomplete") and len(audio) > 0
    assert done.response.usage.output_token_details.audio_tokens == len(audio) // 3840
