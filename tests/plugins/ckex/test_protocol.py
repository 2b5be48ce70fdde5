"""The pure protocol functions: recorded frames in, typed frames and events out; no socket."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tocsin_ckex.protocol import (
    MAX_FRAME,
    ORDER_SLIP,
    ORDER_SLIP_FANCY,
    FancyQuote,
    Keepalive,
    Market,
    QuoteBook,
    Quotes,
    Register,
    ServerError,
    SportsbookQuote,
    Toggle,
    Unsubscribe,
    check_id,
    connect_url,
    event_time,
    parse_command,
    parse_frame,
    parse_time,
    quote_event,
    redact_query,
    register_command,
    safe_url,
    start_command,
    stop_command,
    token_claims,
    token_expiry,
    unsubscribe_command,
)

from tocsin import stable_id

from .conftest import fixture_json, fixture_text


def quotes(raw: str | bytes) -> tuple[Any, ...]:
    frame = parse_frame(raw)
    assert isinstance(frame, Quotes)
    assert frame.invalid == 0
    return frame.quotes


def sb(price: str = "2.37", status: str = "1", product: str = "2") -> SportsbookQuote:
    return SportsbookQuote("41115853-e", "1_31260330", product, price, status)


def fancy(bl: str = "181", ut: str = "2023-11-07T08:29:39.306Z", status: str = "1") -> FancyQuote:
    return FancyQuote("878_55854706_f", "1", bl, "0", "181", "0", status, ut)


# -- frames ---------------------------------------------------------------------------


def test_seed_sportsbook_frame() -> None:
    parsed = quotes(fixture_text("order_slip.json"))
    assert [q.product_id for q in parsed] == ["1", "2", "3"]
    assert parsed[2] == SportsbookQuote("41115853-e", "1_31260330", "3", "10.26", "1")
    type_, data, id_ = quote_event(parsed[1])
    assert type_ == ORDER_SLIP
    assert data == {
        "event_id": "41115853-e",
        "market_id": "1_31260330",
        "product_id": "2",
        "price": 2.37,  # a number, for rules to compare; the id has the string as sent
        "status": "1",
        "open": True,
    }
    assert id_ == stable_id("ckex", ORDER_SLIP, "41115853-e", "1_31260330", "2", "2.37", "1")
    assert event_time(parsed[1]) is None  # no provider time: receipt time


def test_seed_fancy_frame_is_locked_and_timed() -> None:
    (quote,) = quotes(fixture_text("order_slip_fancy.json"))
    type_, data, _ = quote_event(quote)
    assert type_ == ORDER_SLIP_FANCY
    assert data == {
        "mid": "878_55854706_f",
        "pid": "1",
        "bl": 181,
        "bo": 0,
        "ll": 181,
        "lo": 0,
        "ut": "2023-11-07T08:29:39.306Z",
        "status": "-3",
        "open": False,
    }
    expected = datetime(2023, 11, 7, 8, 29, 39, 306000, tzinfo=UTC).timestamp()
    assert event_time(quote) == pytest.approx(expected)


def test_schema_spelling_and_eid_are_accepted() -> None:
    (quote,) = quotes(fixture_text("order_slipt_fancy_with_eid.json"))
    _, data, _ = quote_event(quote)
    assert data["eid"] == "44914246-e"
    assert data["open"] is True and data["bl"] == 175


def test_keepalives_and_error() -> None:
    for frame in fixture_json("keepalives.json"):
        assert parse_frame(json.dumps(frame)) == Keepalive()
    assert parse_frame(fixture_text("error.json")) == ServerError("unknown commend")
    assert parse_frame('{"type":"error","error":{"code":7}}') == ServerError('{"code": 7}')
    assert parse_frame(b'{"type":"error"}') == ServerError("null")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('"{}"', "not a JSON object"),
        ('{"type":"order-slip-odds","data":[]}', "unknown frame type"),
        ('{"data":[]}', "no frame type"),
        ('{"type":7}', "no frame type"),
        ('{"type":"order-slip","data":"1.61"}', "data is not a list"),
        ("[" * 100_000 + "]" * 100_000, "not JSON"),
        ('{"type":"alive","pad":"' + "x" * MAX_FRAME + '"}', "oversized frame"),
    ],
)
def test_bad_frames_have_fixed_reasons(raw: str | bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^{reason}$"):
        parse_frame(raw)


def test_bad_items_are_counted_and_the_rest_kept() -> None:
    good = {"event_id": "e", "market_id": "m", "product_id": "1", "price": "2.1", "status": "1"}
    items = [
        good,
        {**good, "product_id": ""},  # an empty id
        {**good, "status": None},
        {**good, "price": True},
        {**good, "price": "9" * 300},  # longer than any real value
        "not an object",
        {k: v for k, v in good.items() if k != "market_id"},
    ]
    frame = parse_frame(json.dumps({"type": "order-slip", "data": items}))
    assert isinstance(frame, Quotes)
    assert frame.invalid == 6
    assert frame.quotes == (SportsbookQuote("e", "m", "1", "2.1", "1"),)


def test_tolerant_readings() -> None:
    # A single object for data, numbers where strings were documented, no price, null data.
    one = '{"type":"order-slip","data":{"event_id":"e","market_id":"m","product_id":1,"price":2.5,"status":1}}'
    (quote,) = quotes(one)
    assert quote == SportsbookQuote("e", "m", "1", "2.5", "1")
    assert quote_event(quote)[1]["open"] is True
    (locked,) = quotes(
        '{"type":"order-slip","data":[{"event_id":"e","market_id":"m","product_id":"1","status":"0"}]}'
    )
    assert locked.price == "" and quote_event(locked)[1]["open"] is False
    assert quotes('{"type":"order-slip","data":null}') == ()
    (no_ut,) = quotes('{"type":"order-slip-fancy","data":[{"mid":"m","pid":"1","status":"1"}]}')
    assert no_ut == FancyQuote("m", "1", "", "", "", "", "1", "")
    assert event_time(no_ut) is None and "eid" not in quote_event(no_ut)[1]


# -- ids ------------------------------------------------------------------------------


def test_ids_follow_the_fact() -> None:
    # a move back to an earlier value is a new fact: the id knows what it replaced
    assert quote_event(sb(), previous=("2.38", "1"))[2] != quote_event(sb())[2]
    assert (
        quote_event(sb(), previous=("2.38", "1"))[2] == quote_event(sb(), previous=("2.38", "1"))[2]
    )
    first = quote_event(sb())[2]
    assert quote_event(sb())[2] == first  # re-sent: same fact
    assert quote_event(sb(price="2.38"))[2] != first
    assert quote_event(sb(status="2"))[2] != first
    assert quote_event(sb(product="3"))[2] != first
    # A fancy quote re-sent with a newer ut is the same fact; a moved line is not.
    assert quote_event(fancy(ut="2023-11-07T09:00:00Z"))[2] == quote_event(fancy())[2]
    assert quote_event(fancy(bl="182"))[2] != quote_event(fancy())[2]
    assert quote_event(fancy(status="-3"))[2] != quote_event(fancy())[2]


def test_odds_moving_back_and_forth_are_a_new_fact_at_every_move() -> None:
    book = QuoteBook()
    ids = []
    for price in ["3.30", "3.50", "3.30", "3.50", "3.30", "3.30"]:
        quote = sb(price=price)
        previous = book.news(quote)
        if previous is not None:
            ids.append(quote_event(quote, previous, book.move)[2])
    assert len(ids) == 5 == len(set(ids))  # the sixth is a re-sent snapshot: no news
    assert ids[0] == quote_event(sb(price="3.30"))[2]  # a first quote: its values alone
    # Replays number their moves 1, 2, 3...: the same frames give the same ids.
    again = QuoteBook()
    replayed = [
        quote_event(q, p, again.move)[2]
        for q in (sb(price=x) for x in ["3.30", "3.50", "3.30", "3.50", "3.30"])
        if (p := again.news(q)) is not None
    ]
    assert replayed == ids
    # Live, a move is numbered by the clock's milliseconds: a later run never reuses one.
    live = QuoteBook(clock=lambda: 1_800_000_000.0)
    live.news(sb(price="3.30"))
    live.news(sb(price="3.50"))
    assert live.move == 1_800_000_000_000
    live.news(sb(price="3.30"))
    assert live.move == 1_800_000_000_001


def test_quote_book_drops_repeats_and_stale_fancy_quotes() -> None:
    book = QuoteBook()
    assert book.accept(sb())
    assert not book.accept(sb())  # the next snapshot, unchanged
    assert book.accept(sb(price="1.99"))
    assert book.accept(sb())  # back again: news once more (the daemon dedups by id)
    assert book.accept(sb(status="2"))
    assert book.accept(sb(product="3"))

    assert book.accept(fancy(ut="2023-11-07T08:29:39.306Z"))
    assert not book.accept(fancy(ut="2023-11-07T08:29:40Z"))  # newer ut, same values
    assert not book.accept(fancy(bl="170", ut="2023-11-07T08:29:39.500Z"))  # older than seen
    assert book.accept(fancy(bl="182", ut="2023-11-07T08:29:41Z"))
    assert book.accept(fancy(bl="183", ut="not a time"))  # unordered: last write wins


def test_quote_book_is_bounded() -> None:
    book = QuoteBook(max_products=2)
    for product in "123":
        assert book.accept(sb(product=product))
    assert len(book) == 2
    assert book.accept(sb(product="1"))  # forgotten: emitted again, with the same id
    assert not book.accept(sb(product="3"))


# -- commands -------------------------------------------------------------------------


def test_commands_are_the_seeds() -> None:
    seed = {name: json.dumps(frame) for name, frame in fixture_json("commands.json").items()}
    sportsbook = Market("sportsbook", "40789105-e", "219_33753655")
    fancy_market = Market("fancy", "44914246-e", "878_55854706_f")
    assert json.loads(register_command(sportsbook)) == json.loads(seed["sportsbook"])
    assert json.loads(register_command(fancy_market)) == json.loads(seed["fancy"])
    assert json.loads(start_command()) == {"commend": "start"}
    assert json.loads(stop_command()) == {"commend": "stop"}
    assert json.loads(unsubscribe_command("40789105-e", "219_33753655")) == json.loads(
        seed["unsubscribe"]
    )
    assert parse_command(seed["sportsbook"]) == Register(sportsbook)
    assert parse_command(seed["fancy"]) == Register(fancy_market)
    assert parse_command(seed["start"]) == Toggle(running=True)
    assert parse_command(seed["stop"]) == Toggle(running=False)
    assert parse_command(seed["unsubscribe"]) == Unsubscribe("40789105-e", "219_33753655")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ('{"commend":\u201cstop\u201d}', "not JSON"),  # the seed's curly quotes
        ('{"command":"start"}', "no commend"),
        ('{"commend":["start"]}', "no commend"),
        ("[]", "not a JSON object"),
        ('{"commend":"pause"}', "unknown commend"),
        ('{"commend":"order-slip-quote@chloe-market#40789105-e"}', "unknown commend"),
        ('{"commend":"order-slip-quote@chloe-market#a@b@c"}', "unknown commend"),
        ('{"commend":"order-slip-quote@other-market#a@b"}', "unknown commend"),
        ('{"commend":"unsubscribe-order-slip-quote#@b"}', "unknown commend"),
    ],
)
def test_bad_commands(raw: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^{reason}$"):
        parse_command(raw)


@pytest.mark.parametrize("bad", ["", "a@b", "a#b", "a b", "a\nb", "x" * 300])
def test_ids_that_cannot_be_sent(bad: str) -> None:
    with pytest.raises(ValueError):
        check_id(bad)


# -- URL, token, times ----------------------------------------------------------------


def test_url_carries_the_token_and_logs_do_not() -> None:
    url = connect_url("wss://webapi.ckex.xyz/dev-f/quote/do-not-look-back", "a.b+c/d")
    assert url == (
        "wss://webapi.ckex.xyz/dev-f/quote/do-not-look-back?authorization=bearer%20a.b%2Bc%2Fd"
    )
    assert connect_url("ws://h/p?x=1", "t") == "ws://h/p?x=1&authorization=bearer%20t"
    assert safe_url(url) == "wss://webapi.ckex.xyz/dev-f/quote/do-not-look-back"
    assert safe_url("ws://user:pw@h:1/p?authorization=x") == "ws://h:1/p"
    line = "> GET /dev-f/quote/do-not-look-back?authorization=bearer%20abc.def&x=1 HTTP/1.1"
    assert (
        redact_query(line) == "> GET /dev-f/quote/do-not-look-back?authorization=***&x=1 HTTP/1.1"
    )


def test_seed_token_claims() -> None:
    url = fixture_json("seed_url.json")["url"]
    token = url.split("bearer%20", 1)[1]
    claims = token_claims(token)
    assert claims["player_id"] == "ckex_test_player1"
    assert set(claims) == {
        "user_id",
        "player_id",
        "merchant_code",
        "issued_at",
        "expires_at",
        "language",
    }
    assert token_expiry(token) == datetime(2030, 2, 10, tzinfo=UTC).timestamp()
    assert token_expiry("not-a-jwt") is None
    assert token_expiry("a.!!!.c") is None
    assert token_expiry("a.WzFd.c") is None  # a payload that is not an object
    assert token_expiry("a.eyJleHAiOjE3MDAwMDAwMDB9.c") == 1700000000.0  # {"exp":1700000000}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2023-11-07T08:29:39.306Z", datetime(2023, 11, 7, 8, 29, 39, 306000, tzinfo=UTC)),
        ("2030-02-10T00:00:00.000000634Z", datetime(2030, 2, 10, tzinfo=UTC)),
        ("2023-11-07T16:29:39+08:00", datetime(2023, 11, 7, 8, 29, 39, tzinfo=UTC)),
        ("2023-11-07 08:29:39z", datetime(2023, 11, 7, 8, 29, 39, tzinfo=UTC)),
    ],
)
def test_times(text: str, expected: datetime) -> None:
    assert parse_time(text) == pytest.approx(expected.timestamp())


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "2023-11-07",
        "2023-13-07T08:29:39Z",
        "2023-11-07T08:29:39",
        "0000-01-01T00:00:00Z",
    ],
)
def test_bad_times(text: str) -> None:
    assert parse_time(text) is None


# -- properties -----------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
QUOTE_KEYS = st.sampled_from(
    [
        "event_id",
        "market_id",
        "product_id",
        "price",
        "status",
        "mid",
        "pid",
        "bl",
        "bo",
        "ll",
        "lo",
        "ut",
        "eid",
    ]
)
TYPES = st.sampled_from(
    ["order-slip", "order-slip-fancy", "order-slipt-fancy", "alive", "error", "x"]
)
FRAMES = st.builds(
    lambda type_, items: json.dumps({"type": type_, "data": items, "error": items}),
    TYPES,
    st.lists(st.dictionaries(QUOTE_KEYS, JSON, max_size=13), max_size=3) | JSON,
)


@given(st.binary(max_size=200) | st.text(max_size=200) | FRAMES | JSON.map(json.dumps))
def test_any_input_gives_a_frame_or_value_error(raw: str | bytes) -> None:
    try:
        frame = parse_frame(raw)
    except ValueError:
        return
    assert isinstance(frame, Keepalive | ServerError | Quotes)
    if isinstance(frame, Quotes):
        book = QuoteBook()
        for quote in frame.quotes:
            type_, data, id_ = quote_event(quote)
            assert type_ in (ORDER_SLIP, ORDER_SLIP_FANCY) and isinstance(data["open"], bool)
            assert len(id_) == 32
            event_time(quote)
            book.accept(quote)
            assert not book.accept(quote)


@given(
    st.binary(max_size=200) | st.text(max_size=200) | JSON.map(lambda v: json.dumps({"commend": v}))
)
def test_any_command_parses_or_value_error(raw: str | bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_command(raw)


@given(st.text(max_size=60))
def test_any_text_is_a_time_or_none(text: str) -> None:
    assert parse_time(text) is None or isinstance(parse_time(text), float)
    assert token_expiry(text) is None or isinstance(token_expiry(text), float)


def test_odds_are_numbers_and_ids_keep_the_strings_as_sent() -> None:
    _, data, id_ = quote_event(sb(price="2.10"))
    assert data["price"] == 2.1 and isinstance(data["price"], float)
    assert id_ != quote_event(sb(price="2.1"))[2]  # a different wire text is a different fact
    assert quote_event(sb(price="3"))[1]["price"] == 3
    for kept in ("", "-", "1e999"):  # a locked quote's empty price: as sent
        assert quote_event(sb(price=kept, status="2"))[1]["price"] == kept
    assert quote_event(fancy(bl=""))[1]["bl"] == ""


def test_a_book_recalls_what_an_earlier_run_saved() -> None:
    before = QuoteBook()
    before.news(sb(price="2.20"))
    key = QuoteBook.key(sb())
    saved = before.saved(key)
    after = QuoteBook(clock=lambda: 1_800_000_000.0)  # a restart
    after.recall(key, saved)
    assert key in after
    assert after.news(sb(price="2.20")) is None  # the re-sent snapshot: no news
    assert after.news(sb(price="2.37")) == ("2.20", "1")  # a move, numbered by the clock
    assert after.move == 1_800_000_000_000
    fancy_key = QuoteBook.key(fancy())
    before.news(fancy())
    later = QuoteBook()
    later.recall(fancy_key, before.saved(fancy_key))
    assert later.news(fancy(ut="2023-11-07T08:29:38.000Z", bl="99")) is None  # older than saved
    for unreadable in ("", "[1]", "{}", '[["2.20"], "x"]'):
        blank = QuoteBook()
        blank.recall(key, unreadable)
        assert key not in blank  # ignored: the next quote is a first quote
