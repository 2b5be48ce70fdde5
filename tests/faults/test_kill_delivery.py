"""``kill -9`` around a webhook delivery (issue 5, faults 1 and 2): nothing committed is lost,
and a repeat after a crash carries the same ``Idempotency-Key``."""

from __future__ import annotations

from collections.abc import Callable

from tocsin_eospark import EOSParkEmulator

from .harness import (
    DaemonProcess,
    Hit,
    Hook,
    NotifySocket,
    StateDB,
    Traffic,
    config_text,
    wait_for,
)

PENDING, DONE = 0, 1


async def test_kill9_after_commit_before_the_webhook_answers_loses_nothing(
    emulator: EOSParkEmulator,
    hook: Hook,
    notify: NotifySocket,
    state: StateDB,
    daemon: Callable[..., DaemonProcess],
) -> None:
    tocsin = daemon(config_text(emulator, {"hook": hook}))
    hook.hold()
    tocsin.start()
    await notify.wait("READY")
    await wait_for(lambda: emulator.subscribed, what="the subscription")
    await Traffic(emulator).push()
    (first,) = await wait_for(hook.held, what="the webhook request")
    # Committed (the alert and its pending delivery are on disk), not yet answered.
    assert state.alert_ids() == {first.key}
    assert state.states() == {first.key: PENDING}

    await tocsin.kill9()
    hook.release(503)  # the answer goes nowhere: the daemon is gone
    tocsin.start()
    await wait_for(hook.ok_keys, what="the delivery after the restart")

    assert [(h.key, h.status) for h in hook.hits] == [(first.key, 503), (first.key, 200)]
    await wait_for(lambda: state.states() == {first.key: DONE}, what="the delivery marked done")
    assert set(hook.ok_keys()) == state.alert_ids()  # 0 lost


async def test_kill9_after_the_2xx_before_it_is_recorded_repeats_the_same_key(
    emulator: EOSParkEmulator,
    hook: Hook,
    notify: NotifySocket,
    state: StateDB,
    daemon: Callable[..., DaemonProcess],
) -> None:
    async def lock_the_state_then_answer(hit: Hit) -> None:
        # With the write lock held here, the daemon gets the 200 but cannot mark the
        # delivery done: the crash window of fault 2, made deterministic.
        state.lock()

    tocsin = daemon(config_text(emulator, {"hook": hook}), log_level="debug")
    tocsin.start()
    await notify.wait("READY")
    await wait_for(lambda: emulator.subscribed, what="the subscription")
    hook.before_answer = lock_the_state_then_answer
    await Traffic(emulator).push()
    await wait_for(hook.ok_keys, what="the webhook request")
    await tocsin.wait_log("webhook hook: HTTP 200 from")  # the daemon read the answer

    await tocsin.kill9()
    # The path really was exercised: answered 2xx, yet the outbox row is still pending.
    (key,) = hook.ok_keys()
    assert state.states() == {key: PENDING}
    state.unlock()
    hook.before_answer = None
    tocsin.start()
    await wait_for(lambda: len(hook.ok_keys()) == 2, what="the repeat after the restart")

    assert hook.ok_keys() == [key, key]  # the same Idempotency-Key
    assert len(set(hook.ok_keys())) == len(state.alert_ids()) == 1  # distinct keys == alerts
    assert hook.hits[1].body == hook.hits[0].body  # the committed alert, sent again as is
    await wait_for(lambda: state.states() == {key: DONE}, what="the delivery marked done")
