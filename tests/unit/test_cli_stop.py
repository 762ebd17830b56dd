"""``voucher-engine up`` stops on SIGTERM even when the handler's KeyboardInterrupt is lost
(raised inside a callback whose errors Python ignores): the flag it sets is checked
between start-up steps and by the idle loop."""

from __future__ import annotations

import signal

import pytest

from ops import up


def test_a_sigterm_whose_interrupt_was_swallowed_still_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(up, "_TERMINATED", type(up._TERMINATED)())
    up._stop_if_terminated()  # nothing came: goes on
    try:
        with pytest.raises(KeyboardInterrupt):  # ...and an ignored callback ate it
            up._on_sigterm(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with pytest.raises(KeyboardInterrupt):
        up._stop_if_terminated()
