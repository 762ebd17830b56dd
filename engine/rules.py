"""A campaign's rules: conditions on the order, its lines and its customer, every one of
which must hold for the campaign to apply.

* ``min_order`` / ``max_order``: bounds on the order's *eligible* subtotal (excluded lines
  do not count).
* ``items``: conditions on lines, each ``{any_of: {skus, products, categories},
  min_quantity, min_subtotal}``: the eligible lines matching ``any_of`` (every eligible
  line when it is left out) must reach the minimums (one unit when neither is given).
* ``exclude``: lines matching it never count toward a condition and are never discounted.
* ``customer``: ``tags_any`` (at least one of these tags) and ``tags_none`` (none of them),
  evaluated on the tags the gateway supplies: the trusted caller's, or the stored
  customer's (see ``serve/customer_tags.py`` for how fresh).

:func:`check` refuses at creation a rule that could never hold; :func:`evaluate` decides
an order, the same function on every path (validation, reservation, redemption,
qualification), and raises :class:`errors.RuleNotMet` naming the first failed condition.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from engine import errors
from engine.orders import MAX_AMOUNT, MAX_QUANTITY, Item, Order

MAX_NAMES = 1000  # per list of skus, products, categories or tags
MAX_CONDITIONS = 20


class ItemFilter(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Matches a line by its sku, its product or any of its categories (any one suffices)."""

    skus: tuple[str, ...] = ()
    products: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not (self.skus or self.products or self.categories)

    def matches(self, item: Item) -> bool:
        if item.sku in self.skus:
            return True
        if item.product_id is not None and item.product_id in self.products:
            return True
        if self.categories:
            for c in item.categories:
                if c in self.categories:
                    return True
        return False

    def describe(self) -> str:
        """``in category shoes or boots``, ``of sku A-1``... for messages."""
        parts = []
        for names, one, many in (
            (self.categories, "in category", "in categories"),
            (self.products, "of product", "of products"),
            (self.skus, "of sku", "of skus"),
        ):
            if names:
                parts.append(f"{one if len(names) == 1 else many} {', '.join(names[:5])}"
                             + (", ..." if len(names) > 5 else ""))
        return " or ".join(parts)


class ItemCondition(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    any_of: ItemFilter | None = None
    min_quantity: int | None = None
    min_subtotal: int | None = None


class CustomerCondition(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    tags_any: tuple[str, ...] = ()
    tags_none: tuple[str, ...] = ()


class Rules(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    min_order: int | None = None
    max_order: int | None = None
    items: tuple[ItemCondition, ...] = ()
    exclude: ItemFilter | None = None
    customer: CustomerCondition | None = None

    def needs_items(self) -> bool:
        return bool(self.items)

    def needs_tags(self) -> bool:
        return self.customer is not None


# --- checks at creation ------------------------------------------------------------------


def _names(values: Sequence[str], field: str) -> None:
    if len(values) > MAX_NAMES:
        raise errors.InvalidRule(f"{field} holds at most {MAX_NAMES} names")
    for i, v in enumerate(values):
        if not isinstance(v, str) or not 1 <= len(v) <= 128:
            raise errors.InvalidRule(f"{field}[{i}] must be 1-128 characters")
    if len(set(values)) != len(values):
        raise errors.InvalidRule(f"{field} names something twice")


def _filter(f: ItemFilter, field: str) -> None:
    _names(f.skus, f"{field}.skus")
    _names(f.products, f"{field}.products")
    _names(f.categories, f"{field}.categories")
    if f.is_empty():
        raise errors.InvalidRule(f"{field} names no sku, product or category")


def _bound(value: int | None, field: str, top: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise errors.InvalidRule(f"{field} must be an integer from 0 to {top}")


def _excluded_entirely(f: ItemFilter, ex: ItemFilter) -> bool:
    """Whether every line ``f`` matches is excluded by ``ex``: each sku, product and
    category it names is excluded by the same kind of name. (A product or category could
    still be reached through another route, so this only catches the certain case.)"""
    return (
        set(f.skus) <= set(ex.skus)
        and set(f.products) <= set(ex.products)
        and set(f.categories) <= set(ex.categories)
    )


def _needs_some(cond: ItemCondition) -> bool:
    """Whether the condition asks for at least one unit or one minor unit of its items
    (minimums of 0 ask only that the order lists lines, which excluded ones still are)."""
    if cond.min_quantity is None and cond.min_subtotal is None:
        return True
    return bool(cond.min_quantity) or bool(cond.min_subtotal)


def check(rules: Rules, *, min_order: int = 0) -> Rules:
    """Refuse rules that are malformed or could never hold, naming the field; returns
    ``rules``. ``min_order``: the campaign's own minimum, given beside the rules."""
    _bound(rules.min_order, "rules.min_order", MAX_AMOUNT)
    _bound(rules.max_order, "rules.max_order", MAX_AMOUNT)
    # The campaign's own minimum bounds the whole amount, max_order the eligible subtotal:
    # with lines excluded an order can meet both, so only rules.min_order clashes then.
    low = max(min_order if rules.exclude is None else 0, rules.min_order or 0)
    if rules.max_order is not None and rules.max_order < low:
        raise errors.InvalidRule(
            f"rules.max_order {rules.max_order} is below the minimum order {low}: no order fits"
        )
    if len(rules.items) > MAX_CONDITIONS:
        raise errors.InvalidRule(f"rules.items holds at most {MAX_CONDITIONS} conditions")
    if rules.exclude is not None:
        _filter(rules.exclude, "rules.exclude")
    for i, cond in enumerate(rules.items):
        field = f"rules.items[{i}]"
        _bound(cond.min_quantity, f"{field}.min_quantity", MAX_QUANTITY)
        _bound(cond.min_subtotal, f"{field}.min_subtotal", MAX_AMOUNT)
        if cond.any_of is not None:
            _filter(cond.any_of, f"{field}.any_of")
            if (
                rules.exclude is not None
                and _needs_some(cond)
                and _excluded_entirely(cond.any_of, rules.exclude)
            ):
                raise errors.InvalidRule(
                    f"{field} requires items {cond.any_of.describe()}, which rules.exclude "
                    "excludes: it can never hold"
                )
        if (
            rules.max_order is not None
            and cond.min_subtotal is not None
            and cond.min_subtotal > rules.max_order
        ):
            raise errors.InvalidRule(
                f"{field}.min_subtotal {cond.min_subtotal} is above rules.max_order "
                f"{rules.max_order}: it can never hold"
            )
    if rules.customer is not None:
        cc = rules.customer
        _names(cc.tags_any, "rules.customer.tags_any")
        _names(cc.tags_none, "rules.customer.tags_none")
        if not cc.tags_any and not cc.tags_none:
            raise errors.InvalidRule("rules.customer names no tag")
        if cc.tags_any and set(cc.tags_any) <= set(cc.tags_none):
            raise errors.InvalidRule(
                "rules.customer: every tag of tags_any is in tags_none; it can never hold"
            )
    return rules


# --- evaluation --------------------------------------------------------------------------


def eligible(rules: Rules | None, order: Order) -> list[int]:
    """Indexes of the order's lines that count: every line not excluded."""
    ex = rules.exclude if rules is not None else None
    if ex is None:
        return list(range(len(order.items)))
    return [i for i, it in enumerate(order.items) if not ex.matches(it)]


def eligible_subtotal(order: Order, lines: Sequence[int]) -> int:
    if not order.items:
        return order.amount
    items = order.items
    return sum(items[i].total for i in lines)


def matching(rules: Rules | None, order: Order, lines: Sequence[int]) -> list[int]:
    """The eligible lines an item-level discount applies to: those matching any item
    condition's ``any_of``; every eligible line when no condition names items."""
    filters = [c.any_of for c in rules.items if c.any_of is not None] if rules is not None else []
    if not filters:
        return list(lines)
    items = order.items
    return [i for i in lines if any(f.matches(items[i]) for f in filters)]


def evaluate(rules: Rules, order: Order, tags: Sequence[str] | None, lines: Sequence[int]) -> None:
    """Raise :class:`errors.RuleNotMet` naming the first condition ``order`` (its eligible
    ``lines``) and the customer's ``tags`` fail; ``tags`` None means none are known."""
    if rules.min_order is not None or rules.max_order is not None:
        subtotal = eligible_subtotal(order, lines)
        if rules.min_order is not None and subtotal < rules.min_order:
            raise errors.RuleNotMet(
                f"needs an order of at least {rules.min_order}"
                f"{' (excluded items not counted)' if rules.exclude else ''}, the order has {subtotal}"
            )
        if rules.max_order is not None and subtotal > rules.max_order:
            raise errors.RuleNotMet(
                f"applies to orders up to {rules.max_order}, the order has {subtotal}"
            )
    if rules.items:
        items = order.items
        for cond in rules.items:
            f = cond.any_of
            what = f"items {f.describe()}" if f is not None else "items"
            if not items:
                raise errors.RuleNotMet(f"needs {what}: the order lists no items")
            hit = [i for i in lines if f is None or f.matches(items[i])]
            qty = sum(items[i].quantity for i in hit)
            need_q = cond.min_quantity
            if need_q is None and cond.min_subtotal is None:
                need_q = 1
            if need_q is not None and qty < need_q:
                if f is None:
                    label = "item" if need_q == 1 else "items"
                else:
                    label = f"{'item' if need_q == 1 else 'items'} {f.describe()}"
                raise errors.RuleNotMet(f"needs {need_q} {label}, the order has {qty}")
            if cond.min_subtotal is not None:
                sub = sum(items[i].total for i in hit)
                if sub < cond.min_subtotal:
                    raise errors.RuleNotMet(
                        f"needs {cond.min_subtotal} of {what}, the order has {sub}"
                    )
    cc = rules.customer
    if cc is not None:
        have = set(tags or ())
        if cc.tags_any and not have.intersection(cc.tags_any):
            raise errors.RuleNotMet(
                f"needs a customer tagged {' or '.join(cc.tags_any[:5])}"
                + (", the customer has none of them" if tags is not None else ", no customer tags are known")
            )
        bad = have.intersection(cc.tags_none)
        if bad:
            raise errors.RuleNotMet(f"not for customers tagged {sorted(bad)[0]}")

