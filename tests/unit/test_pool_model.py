"""Stateful property tests: the shard against a small reference model.

Each machine drives one campaign (unique discount codes, a shared code with limits, gift
cards) through redemptions, rollbacks, holds, confirms, releases, pauses, clock jumps,
idempotent replays, assignments and restarts from the fake database, and after every step
checks that the engine answers what the model says and that the safety invariants hold:
never more redemptions than the limit, never a code redeemed twice, balances never
negative, and a rollback restores exactly.

The rules the model encodes: only ``assign`` ties a code to a customer (redeeming never
does, so a rollback puts a bearer code back to available and an assigned code back to its
owner); a partly spent gift card keeps its status, a fully spent one is redeemed; ``assign``
hands out only available, unheld codes, and of gift cards only those with no active spend;
a hold past its TTL never blocks a decision, and every decision (validate, redeem, reserve,
confirm of an open hold, assign that searches the bank) first expires the due holds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from engine import errors
from engine.campaigns import Campaign
from engine.codes import normalize
from engine.events import CONFIRMED, EXPIRED, HELD, R_ACTIVE, R_ROLLED_BACK, RELEASED
from engine.shard_state import Outcome, RedeemRequest
from tests.unit.test_pools import Shop, discount_campaign, gift_campaign, shared_campaign

MODEL_TTL = timedelta(minutes=10)
CUSTOMERS = st.sampled_from(["a", "b", "c", None])
AMOUNTS = st.sampled_from([-1, 0, 50, 150, 999, 1000, 2500, 7000])
KEYS = st.sampled_from([None, None, "k1", "k2", "k3"])
SETTINGS = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass
class Red:
    code: str
    cust: str | None
    amount: int
    discount: int
    active: bool = True


@dataclass
class Hold:
    code: str
    cust: str | None
    amount: int
    expires: datetime
    state: int = HELD  # HELD means "not closed by a call"; liveness also needs the clock


@dataclass
class Model:
    """What the engine should do, written the simple way."""

    kind: str  # "discount", "shared" or "gift"
    codes: list[str]
    min_order: int = 0
    total: int | None = None
    per: int | None = None
    gift: int = 0
    paused: bool = False
    status: dict[str, str] = field(default_factory=dict)
    owner: dict[str, str | None] = field(default_factory=dict)
    balance: dict[str, int] = field(default_factory=dict)
    cust_code: dict[str, str] = field(default_factory=dict)
    reds: dict[str, Red] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind != "shared":
            for c in self.codes:
                self.status[c] = "available"
                self.owner[c] = None
                if self.kind == "gift":
                    self.balance[c] = self.gift

    # --- derived -----------------------------------------------------------------------

    def live(self, now: datetime, mine: str | None = None) -> list[Hold]:
        return [
            h for rid, h in self.holds.items()
            if h.state == HELD and now < h.expires and rid != mine
        ]

    def expire(self, now: datetime) -> None:
        """What the engine's sweep does: every hold past its TTL is closed as expired."""
        for h in self.holds.values():
            if h.state == HELD and now >= h.expires:
                h.state = EXPIRED

    def assignable(self, code: str, now: datetime) -> bool:
        """Whether ``assign`` may hand out ``code``: available (so nobody owns it), not under
        a live hold and, for a gift card, with no active spend (a card whose spends were all
        rolled back is untouched again)."""
        if self.status[code] != "available" or any(h.code == code for h in self.live(now)):
            return False
        assert self.owner[code] is None
        if self.kind == "gift":
            return not any(r.code == code for r in self.active())
        return True

    def active(self, cust: str | None = None) -> list[Red]:
        return [r for r in self.reds.values() if r.active and (cust is None or r.cust == cust)]

    def discount(self, code: str, amount: int) -> int:
        if self.kind == "gift":
            return min(self.balance[code], amount)
        if self.kind == "shared":
            return min(500, amount)
        return min(amount * 10 // 100, 500, amount)  # 10 %, at most 500

    def why_not(
        self, raw: str, cust: str | None, amount: int, now: datetime, mine: str | None = None
    ) -> str | None:
        """The engine's error code for this request, or None if it redeems."""
        if not raw.strip():
            return "malformed_code"
        code = normalize(raw)
        if code not in self.codes:
            return "unknown_code"
        if self.paused:
            return "campaign_paused"
        if amount < 0:
            return "invalid_input"
        if amount < self.min_order:
            return "order_too_small"
        if self.kind == "shared":
            if self.per is not None and cust is None:
                return "invalid_input"
            live = self.live(now, mine)
            if self.total is not None and len(self.active()) + len(live) >= self.total:
                return "exhausted"
            if self.per is not None:
                mine_live = sum(1 for h in live if h.cust == cust)
                if len(self.active(cust)) + mine_live >= self.per:
                    return "customer_limit_reached"
            return None
        if self.status[code] == "redeemed":
            return "exhausted" if self.kind == "gift" else "already_redeemed"
        if any(h.code == code for h in self.live(now, mine)):
            return "code_reserved"
        if self.owner[code] is not None and self.owner[code] != cust:
            return "wrong_customer"
        if self.kind == "gift" and self.balance[code] <= 0:
            return "exhausted"
        return None

    # --- effects -----------------------------------------------------------------------

    def redeem(self, rid: str, code: str, cust: str | None, amount: int) -> Red:
        """A redemption never changes who owns the code: only ``assign`` does."""
        red = Red(code, cust, amount, self.discount(code, amount))
        self.reds[rid] = red
        if self.kind == "shared":
            return red
        if self.kind == "gift":
            self.balance[code] -= red.discount
            if self.balance[code] == 0:
                self.status[code] = "redeemed"
            # a partly spent card keeps its status: available stays available (anyone may
            # spend a bearer card), assigned stays assigned
        else:
            self.status[code] = "redeemed"
        return red

    def rollback(self, rid: str) -> None:
        red = self.reds[rid]
        red.active = False
        if self.kind == "shared":
            return
        code = red.code
        if self.kind == "gift":
            self.balance[code] += red.discount
            if self.status[code] != "redeemed":
                return  # undoing a partial spend: the card keeps its status
        # back exactly as before: to its owner if it was assigned, else available
        self.status[code] = "assigned" if self.owner[code] is not None else "available"

    def assign(self, code: str, cust: str) -> None:
        self.cust_code[cust] = code
        self.owner[code] = cust
        self.status[code] = "assigned"


class PoolMachine(RuleBasedStateMachine):
    """Shared rules; subclasses pick the campaign and its codes."""

    redemptions = Bundle("redemptions")
    reservations = Bundle("reservations")
    code_choices: tuple[str, ...] = ()

    def make(self) -> tuple[Campaign, list[str], Model]:
        raise NotImplementedError

    @initialize()
    def setup(self) -> None:
        self.shop = Shop(seed=3, ttl=MODEL_TTL)
        campaign, codes, self.model = self.make()
        self.cid = campaign.id
        self.shop.install(campaign, codes)
        self.replies: dict[str, tuple[tuple[Any, ...], Outcome]] = {}
        self.after_setup()

    def after_setup(self) -> None:
        pass

    @property
    def now(self) -> datetime:
        return self.shop.clock()

    # --- rules -------------------------------------------------------------------------

    def _redeem(self, raw: str, cust: str | None, amount: int, key: str | None) -> str | None:
        m, state = self.model, self.shop.state
        body = ("redeem", raw, cust, amount)
        req = RedeemRequest(raw, amount, "EUR", cust, None, key)
        if key is not None and key in self.replies:
            first_body, first = self.replies[key]
            self.shop.sync()
            before = self.snapshot()
            out = state.redeem_one(req)
            if first_body == body:
                assert out == first
            else:
                assert out.rejection is not None
                assert out.rejection.error == "idempotency_conflict"
            assert state.drain() == []
            assert self.snapshot() == before
            return None
        expected = m.why_not(raw, cust, amount, self.now)
        m.expire(self.now)  # the decision sweeps due holds first, whatever its answer
        out = state.redeem_one(req)
        # only a final answer is kept for the key: "not now" leaves it free for a retry
        if key is not None and not (out.rejection and errors.is_transient(out.rejection.error)):
            self.replies[key] = (body, out)
        if expected is not None:
            assert out.rejection is not None, out
            assert out.rejection.error == expected, (out.rejection, expected)
            return None
        assert out.redemption is not None, (out, expected)
        r = out.redemption
        red = m.redeem(r.id, normalize(raw), cust, amount)
        assert (r.code, r.customer_id, r.order_amount, r.discount_amount) == (
            red.code, cust, amount, red.discount,
        )
        if m.kind == "gift":
            assert r.balance_after == m.balance[red.code]
        return r.id

    @rule(target=redemptions, data=st.data(), cust=CUSTOMERS, amount=AMOUNTS, key=KEYS)
    def redeem(self, data: st.DataObject, cust: str | None, amount: int, key: str | None) -> Any:
        raw = data.draw(st.sampled_from(self.code_choices))
        rid = self._redeem(raw, cust, amount, key)
        return rid if rid is not None else "red_unknown"

    @rule(rid=redemptions)
    def rollback(self, rid: str) -> None:
        red = self.model.reds.get(rid)
        out = self.shop.state.rollback_one(rid)
        if red is None:
            assert out.rejection is not None and out.rejection.error == "unknown_redemption"
        elif not red.active:
            assert out.rejection is not None and out.rejection.error == "already_rolled_back"
        else:
            assert out.redemption is not None, out
            assert out.redemption.status == R_ROLLED_BACK
            assert out.redemption.rolled_back_at == self.now
            self.model.rollback(rid)

    @rule(target=reservations, data=st.data(), cust=CUSTOMERS, amount=AMOUNTS)
    def reserve(self, data: st.DataObject, cust: str | None, amount: int) -> Any:
        raw = data.draw(st.sampled_from(self.code_choices))
        expected = self.model.why_not(raw, cust, amount, self.now)
        self.model.expire(self.now)
        try:
            res = self.shop.state.reserve(RedeemRequest(raw, amount, "EUR", cust))
        except errors.VoucherError as exc:
            assert exc.code == expected, (exc, expected)
            return "res_unknown"
        assert expected is None, (res, expected)
        assert res.expires_at == self.now + MODEL_TTL
        self.model.holds[res.id] = Hold(normalize(raw), cust, amount, res.expires_at)
        return res.id

    def _open(self, rid: str) -> Hold | str:
        h = self.model.holds.get(rid)
        if h is None:
            return "unknown_reservation"
        if h.state == HELD and self.now >= h.expires:
            h.state = EXPIRED
        if h.state != HELD:
            return "reservation_closed"
        return h

    @rule(rid=reservations)
    def confirm(self, rid: str) -> None:
        h = self._open(rid)
        expected = h if isinstance(h, str) else self.model.why_not(
            h.code, h.cust, h.amount, self.now, mine=rid
        )
        if isinstance(h, Hold):
            self.model.expire(self.now)  # an open hold is confirmed through a full decision
        try:
            r = self.shop.state.confirm(rid)
        except errors.VoucherError as exc:
            assert exc.code == expected, (exc, expected)
            return
        assert expected is None and isinstance(h, Hold), (r, expected)
        red = self.model.redeem(r.id, h.code, h.cust, h.amount)
        assert (r.code, r.customer_id, r.discount_amount) == (h.code, h.cust, red.discount)
        h.state = CONFIRMED
        assert self.shop.state.reservations[rid].redemption_id == r.id

    @rule(rid=reservations)
    def release(self, rid: str) -> None:
        h = self._open(rid)
        try:
            out = self.shop.state.release(rid)
        except errors.VoucherError as exc:
            assert isinstance(h, str) and exc.code == h, (exc, h)
            return
        assert isinstance(h, Hold) and out.state == RELEASED
        h.state = RELEASED

    @rule(data=st.data(), cust=CUSTOMERS, amount=AMOUNTS)
    def validate(self, data: st.DataObject, cust: str | None, amount: int) -> None:
        m = self.model
        raw = data.draw(st.sampled_from(self.code_choices))
        expected = m.why_not(raw, cust, amount, self.now)
        m.expire(self.now)
        v = self.shop.state.validate_one(RedeemRequest(raw, amount, "EUR", cust)).validation
        assert v is not None
        assert (v.valid, v.error) == (expected is None, expected), (v, expected)
        if expected is None:
            code = normalize(raw)
            assert (v.code, v.campaign_id) == (code, self.cid)
            assert v.discount_amount == m.discount(code, amount)
            assert v.balance == (m.balance[code] if m.kind == "gift" else None)

    @rule(cust=st.sampled_from(["a", "b", "c", "d"]))
    def assign(self, cust: str) -> None:
        m = self.model
        try:
            a = self.shop.state.assign(self.cid, cust)
        except errors.BankExhausted:
            assert m.kind != "shared" and cust not in m.cust_code
            m.expire(self.now)
            fresh = [c for c in m.codes if m.assignable(c, self.now)]
            assert fresh == [], f"bank exhausted with {fresh} assignable"
            return
        assert (a.campaign_id, a.customer_id) == (self.cid, cust)
        if m.kind == "shared":
            assert (a.code, a.created) == (m.codes[0], False)
            return
        if cust in m.cust_code:  # a re-run: the same code, whatever happened to it since
            assert (a.code, a.created) == (m.cust_code[cust], False)
            return
        m.expire(self.now)  # a search of the bank sweeps due holds first
        assert a.created and m.assignable(a.code, self.now), (a, m.status, m.balance)
        m.assign(a.code, cust)

    @rule(minutes=st.sampled_from([1, 4, 9, 10, 11, 30]))
    def advance(self, minutes: int) -> None:
        self.shop.clock.advance(minutes=minutes)

    @rule()
    def sweep(self) -> None:
        due = {rid for rid, r in self.shop.state.reservations.items()
               if r.state == HELD and r.expires_at <= self.now}
        assert self.shop.state.expire_reservations() == len(due)
        self.model.expire(self.now)

    @rule()
    def pause_or_resume(self) -> None:
        self.shop.move(self.cid, "activate" if self.model.paused else "pause")
        self.model.paused = not self.model.paused

    @rule()
    def restart(self) -> None:
        """Crash and reload from the rows: the rebuilt shard answers the same."""
        self.sweep()  # recovery expires due holds; do it first so the views compare
        self.shop.sync()
        before = self.snapshot()
        self.restarts = getattr(self, "restarts", 0) + 1
        rebuilt = self.shop.restart(seed=1000 + self.restarts)  # fresh ids after a restart
        assert rebuilt.drain() == []
        assert self.snapshot() == before
        for key, (body, first) in self.replies.items():
            _, raw, cust, amount = body
            assert rebuilt.redeem_one(RedeemRequest(raw, amount, "EUR", cust, None, key)) == first
        assert rebuilt.drain() == []

    # --- checks ------------------------------------------------------------------------

    def snapshot(self) -> Any:
        state = self.shop.state
        return (
            state.stats(self.cid),
            [state.voucher(c) for c in self.model.codes],
            dict(state.redemptions),
            dict(state.reservations),
        )

    @invariant()
    def engine_matches_model(self) -> None:
        if not hasattr(self, "model"):
            return
        m, state, now = self.model, self.shop.state, self.now
        s = state.stats(self.cid)
        active = m.active()
        # Holds past their TTL that no decision has swept yet may still be open in the
        # engine (reads do not sweep); every other hold is exactly as the model says.
        assert set(state.reservations) == set(m.holds)
        for rid, h in m.holds.items():
            got = state.reservations[rid].state
            if h.state == HELD and now >= h.expires:
                assert got in (HELD, EXPIRED), (rid, got, h)
            else:
                assert got == h.state, (rid, got, h)
        open_holds = [r for r in state.reservations.values() if r.state == HELD]
        assert s.redemptions == len(m.reds)
        assert s.rollbacks == len(m.reds) - len(active)
        assert s.active_redemptions == len(active)
        assert s.discount_total == sum(r.discount for r in active)
        assert s.order_total == sum(r.amount for r in active)
        assert s.held == len(open_holds), (s.held, open_holds)
        if m.kind == "shared":
            v = state.voucher(m.codes[0])
            assert v["redemptions"] == len(active) and v["limit"] == m.total
        else:
            counts = [sum(1 for c in m.codes if m.status[c] == name)
                      for name in ("available", "assigned", "redeemed")]
            assert [s.available, s.assigned, s.redeemed, s.void] == [*counts, 0]
            for code in m.codes:
                v = state.voucher(code)
                assert v["status"] == m.status[code], (code, v, m.status[code])
                assert v["customer_id"] == m.owner[code], (code, v, m.owner[code])
                assert v["reserved"] is any(r.code == code for r in open_holds), (code, v)
                if m.kind == "gift":
                    assert v["balance"] == m.balance[code]
            assert s.gift_balance_outstanding == sum(m.balance.values())
        assert set(state.redemptions) == set(m.reds)
        for rid, red in m.reds.items():
            r = state.redemptions[rid]
            assert r.status == (R_ACTIVE if red.active else R_ROLLED_BACK)

    @invariant()
    def assign_hands_out_exactly_the_assignable_codes(self) -> None:
        """On a throwaway copy of the shard, new customers drain the bank: they must get
        every assignable code once and nothing else (no code lost from the bank, none
        handed out that is held, owned, redeemed or partly spent)."""
        if not hasattr(self, "model") or self.model.kind == "shared":
            return
        m, now = self.model, self.now
        probe = copy.deepcopy(self.shop.state)
        handed: list[str] = []
        for i in range(len(m.codes) + 1):
            try:
                handed.append(probe.assign(self.cid, f"probe-{i}").code)
            except errors.BankExhausted:
                break
        assignable = [c for c in m.codes if m.assignable(c, now)]
        assert sorted(handed) == assignable, (handed, assignable, m.status, m.holds)

    @invariant()
    def safety(self) -> None:
        """The promises, checked on the engine's own records alone."""
        if not hasattr(self, "model"):
            return
        state, m = self.shop.state, self.model
        active = [r for r in state.redemptions.values() if r.status == R_ACTIVE]
        if m.kind == "shared":
            if m.total is not None:
                assert len(active) <= m.total
            if m.per is not None:
                for cust in {r.customer_id for r in active}:
                    assert sum(1 for r in active if r.customer_id == cust) <= m.per
        elif m.kind == "discount":
            redeemed = [r.code for r in active]
            assert len(redeemed) == len(set(redeemed)), "a code was redeemed twice"
        else:
            for code in m.codes:
                spent = sum(r.discount_amount for r in active if r.code == code)
                balance = state.voucher(code)["balance"]
                assert balance >= 0 and balance == m.gift - spent


class DiscountMachine(PoolMachine):
    code_choices = ("DSC-1", "DSC-2", "dsc-3 ", "DSC-4", "NOPE-9", "  ")

    def make(self) -> tuple[Campaign, list[str], Model]:
        codes = ["DSC-1", "DSC-2", "DSC-3", "DSC-4"]
        return discount_campaign(min_order=100), codes, Model("discount", codes, min_order=100)

    def after_setup(self) -> None:
        for cust in ("a", "b"):  # two codes are assigned before anything else happens
            a = self.shop.state.assign(self.cid, cust)
            assert a.created and self.model.assignable(a.code, self.now)
            self.model.assign(a.code, cust)


class SharedMachine(PoolMachine):
    code_choices = ("SAVE5", "save5", "NOPE-9", "")

    def make(self) -> tuple[Campaign, list[str], Model]:
        c = shared_campaign(total=4, per=2)
        return c, [], Model("shared", ["SAVE5"], total=4, per=2)


class GiftMachine(PoolMachine):
    code_choices = ("GFT-1", "GFT-2", "gft-3", "NOPE-9")

    def make(self) -> tuple[Campaign, list[str], Model]:
        codes = ["GFT-1", "GFT-2", "GFT-3"]
        return gift_campaign(balance=3000), codes, Model("gift", codes, gift=3000)


TestDiscountPool = DiscountMachine.TestCase
TestDiscountPool.settings = SETTINGS
TestSharedCodePool = SharedMachine.TestCase
TestSharedCodePool.settings = SETTINGS
TestGiftCardPool = GiftMachine.TestCase
TestGiftCardPool.settings = SETTINGS
