"""The webhook sender's schedule: exponential backoff with full jitter, capped, never past give_up_at."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from lcmq.repository import WebhookDeliveryRecord
from lcmq.settings import Settings
from scheduler.webhooks import AttemptResult, backoff_s, next_step

T0 = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)


def delivery(attempts: int, give_up_in_s: float = 3600) -> WebhookDeliveryRecord:
    return WebhookDeliveryRecord(
        id="msg_x",
        batch_id="b",
        event="batch.final",
        url="https://hooks.example/x",
        owner="shop",
        body="{}",
        state="pending",
        attempts=attempts,
        next_attempt_at=T0,
        claimed_until=T0,
        give_up_at=T0 + timedelta(seconds=give_up_in_s),
        delivered_at=None,
        created_at=T0,
    )


def test_backoff_doubles_from_the_first_wait_up_to_the_cap():
    ceilings = [backoff_s(n, 5, 600, draw=lambda: 1.0) for n in range(1, 11)]
    assert ceilings == [5, 10, 20, 40, 80, 160, 320, 600, 600, 600]


def test_backoff_is_a_uniform_draw_below_the_ceiling():
    assert backoff_s(3, 5, 600, draw=lambda: 0.0) == 0
    assert backoff_s(3, 5, 600, draw=lambda: 0.5) == 10
    draws = {backoff_s(4, 5, 600) for _ in range(50)}
    assert all(0 <= d < 40 for d in draws) and len(draws) > 1  # jittered, not one value


def test_a_failed_attempt_waits_then_the_last_attempt_is_at_give_up_at_then_it_fails():
    settings = Settings(webhook_backoff_first_s=5, webhook_backoff_max_s=600)
    failed = AttemptResult(500, "HTTP 500", 3.0)
    next_at, gave_up = next_step(delivery(0), failed, T0, settings)
    assert not gave_up and T0 <= next_at <= T0 + timedelta(seconds=5)
    # A wait that would pass give_up_at is cut to it: the delivery is tried for the whole period.
    late = T0 + timedelta(seconds=3599)
    next_at, gave_up = next_step(delivery(9), failed, late, settings)
    assert not gave_up and next_at <= T0 + timedelta(seconds=3600)
    assert next_step(delivery(10), failed, T0 + timedelta(seconds=3600), settings) == (None, True)


def test_a_2xx_delivers_and_nothing_to_sign_with_gives_up_at_once():
    settings = Settings()
    assert next_step(delivery(0), AttemptResult(204, None, 1.0), T0, settings) == (None, False)
    unsigned = AttemptResult(None, "no signing secret", 0.1, permanent=True)
    assert next_step(delivery(0), unsigned, T0, settings) == (None, True)
    assert AttemptResult(302, "redirect", 1.0).delivered is False
