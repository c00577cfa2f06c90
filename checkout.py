"""What a payment is for: the catalogue, orders priced by the server, tickets, signed links.

A shop either lets the server price an order from its catalogue (`items`), or prices it
in its own back end and signs the link it sends the customer to (`CHECKOUT_SECRET`), so
that nobody pays 1 KES for a 15,000 KES cart and gets a "completed". No Flask here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import asdict, dataclass, field

from mpesa import ID_PATTERN, InvalidInput

MAX_LINES = 20
MAX_QUANTITY = 100
# Crockford-style alphabet: no 0/O or 1/I/L to misread at the door.
_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"


def _code(prefix: str, length: int) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def order_number() -> str:
    return _code("ORD-", 8)


def ticket_number() -> str:
    return _code("TKT-", 10)


@dataclass(frozen=True)
class Item:
    id: str
    name: str
    price: int
    description: str = ""
    kind: str = "item"  # "item" | "ticket"
    capacity: int | None = None  # units that may ever be sold; None: unlimited


@dataclass(frozen=True)
class OrderLine:
    id: str
    name: str
    quantity: int
    unitPrice: int
    lineTotal: int
    kind: str


@dataclass(frozen=True)
class Order:
    number: str
    lines: tuple[OrderLine, ...] = field(default_factory=tuple)

    @property
    def total(self) -> int:
        return sum(line.lineTotal for line in self.lines)

    def to_dict(self) -> dict:
        return {"number": self.number, "items": [asdict(line) for line in self.lines]}


class Catalog:
    """The items a shop sells, read from CATALOG_FILE (a JSON file)."""

    def __init__(self, items: list[Item]):
        self.items = {item.id: item for item in items}

    @classmethod
    def load(cls, path: str) -> Catalog:
        """Read and check the catalogue; ValueError names the problem in one line."""
        try:
            with open(path, encoding="utf-8") as handle:
                document = json.load(handle)
        except OSError as error:
            raise ValueError(f"CATALOG_FILE: cannot read {path!r} ({error.strerror})") from None
        except ValueError as error:
            raise ValueError(f"CATALOG_FILE: {path!r} is not valid JSON ({error})") from None
        raw_items = document.get("items") if isinstance(document, dict) else document
        if not isinstance(raw_items, list) or not raw_items:
            raise ValueError('CATALOG_FILE: expected a list of items (or {"items": [...]})')
        items = [_item(raw, n) for n, raw in enumerate(raw_items)]
        if len({item.id for item in items}) != len(items):
            raise ValueError("CATALOG_FILE: item ids must be unique")
        return cls(items)

    def price(self, raw_lines, max_amount: int) -> Order:
        """Turn [{"id", "quantity"}] into an order priced from the catalogue."""
        if not isinstance(raw_lines, list) or not raw_lines:
            raise InvalidInput("items", "items must be a non-empty list of {id, quantity}")
        if len(raw_lines) > MAX_LINES:
            raise InvalidInput("items", f"An order may have at most {MAX_LINES} lines")
        quantities: dict[str, int] = {}
        for raw in raw_lines:
            if not isinstance(raw, dict):
                raise InvalidInput("items", "Each item must be an object with id and quantity")
            item_id, quantity = raw.get("id"), raw.get("quantity", 1)
            if not isinstance(item_id, str) or item_id not in self.items:
                raise InvalidInput("items", f"Unknown item: {str(item_id)[:64]}")
            if isinstance(quantity, bool) or not isinstance(quantity, int) or not 1 <= quantity <= MAX_QUANTITY:
                raise InvalidInput("items", f"Quantity of {item_id} must be a whole number from 1 to {MAX_QUANTITY}")
            quantities[item_id] = quantities.get(item_id, 0) + quantity
        lines = []
        for item_id, quantity in quantities.items():
            item = self.items[item_id]
            if quantity > MAX_QUANTITY:
                raise InvalidInput("items", f"Quantity of {item_id} must be at most {MAX_QUANTITY}")
            lines.append(OrderLine(item.id, item.name, quantity, item.price, item.price * quantity, item.kind))
        order = Order(order_number(), tuple(lines))
        if order.total > max_amount:
            raise InvalidInput(
                "items", f"The order total of {order.total:,} KES exceeds the maximum of {max_amount:,} KES per payment"
            )
        return order


def _item(raw, n: int) -> Item:
    where = f"CATALOG_FILE: item {n + 1}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is not an object")
    item_id, name, price = raw.get("id"), raw.get("name"), raw.get("price")
    if not isinstance(item_id, str) or not ID_PATTERN.match(item_id):
        raise ValueError(f"{where}: id must be 1-64 letters, digits, '-' or '_'")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where} ({item_id}): name is required")
    if isinstance(price, bool) or not isinstance(price, int) or price < 1:
        raise ValueError(f"{where} ({item_id}): price must be a whole number of KES, at least 1")
    kind = raw.get("kind", "item")
    if kind not in ("item", "ticket"):
        raise ValueError(f"{where} ({item_id}): kind must be 'item' or 'ticket'")
    capacity = raw.get("capacity")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"{where} ({item_id}): capacity must be a whole number or absent")
    return Item(item_id, name.strip(), price, str(raw.get("description") or ""), kind, capacity)


LINK_FIELDS = ("amount", "accountReference", "description", "expires")


def link_message(amount, account_reference, description, expires) -> str:
    """The text a checkout link's signature covers: its fields as they are sent."""
    values = dict(zip(LINK_FIELDS, (amount, account_reference, description, expires), strict=True))
    return "&".join(f"{name}={'' if values[name] is None else values[name]}" for name in LINK_FIELDS)


def sign_link(secret: str, amount, account_reference="", description="", expires=0) -> str:
    """Hex HMAC-SHA256 of the link's fields: what a shop's back end puts in `signature`."""
    message = link_message(amount, account_reference, description, expires)
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def check_link(secret: str, body: dict, now: float) -> None:
    """Refuse a push whose signed fields were changed, or whose link has expired."""
    signature = body.get("signature")
    if not isinstance(signature, str) or not signature:
        raise InvalidInput("signature", "This shop requires a signed checkout link")
    expires = body.get("expires")
    amount, account_reference, description = (body.get(name, "") for name in LINK_FIELDS[:3])
    expected = sign_link(secret, amount, account_reference, description, expires)
    if not hmac.compare_digest(signature.lower().encode(), expected.encode()):
        raise InvalidInput("signature", "The checkout link was changed or is invalid")
    try:
        expires_at = int(str(expires))
    except ValueError:
        raise InvalidInput("expires", "The checkout link has no valid expiry") from None
    if expires_at < now:
        raise InvalidInput("expires", "The checkout link has expired")
