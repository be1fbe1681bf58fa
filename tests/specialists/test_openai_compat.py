"""The native OpenAI-compatible client's error messages: short, once-prefixed, no client internals."""

from __future__ import annotations

import pytest

from concilium.policy.schema import ModelSpec
from concilium.specialists.base import ProviderError
from concilium.specialists.openai_compat import OpenAICompatProvider
from tests.support import free_port


async def test_a_refused_connection_reads_plainly():
    port = free_port()  # nothing listens there
    p = OpenAICompatProvider("primary", ModelSpec(provider="openai", base_url=f"http://127.0.0.1:{port}/v1",
                                                  model="m"))
    try:
        for call in (lambda: p.complete({"messages": []}, timeout=5),
                     lambda: p.stream({"messages": []}, timeout=5).__anext__()):
            with pytest.raises(ProviderError) as e:
                await call()
            msg = e.value.message
            assert msg.startswith("primary: ") and not msg.startswith("primary: primary")
            assert f"cannot connect to 127.0.0.1:{port}" in msg and "refused" in msg.lower()
            assert "ssl:" not in msg and "Connect call failed" not in msg and "[" not in msg
    finally:
        await p.close()
