"""The chat page (GET /) in headless Chromium, driven by selenium, against a real `gpt-pipeline serve` of the micro
chain's trained checkpoints.

What must hold: the page lists the checkpoints /v1/models gives; a question sent with Enter streams its reply into
the page delta by delta, and the reply ends as the server's own non-streamed answer at temperature 0, turn after
turn; Shift+Enter is a new line; Reset clears the conversation; Stop ends a reply where it got to, and it stays in
the conversation; a bad request shows the server's error and status in the page, and the server serves on.
Debian's chromium and its chromedriver are used as installed (never Selenium Manager, which would download a
browser). A screenshot of a conversation is left in outputs/test-artifacts/chat_page.png.
"""
from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from conftest import REPO, Server, chain_copy

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = REPO / "outputs" / "test-artifacts" / "chat_page.png"
# streaming shows in a reply of two tokens or more: the first of these questions that gets one is asked
CANDIDATES = ["What is 12 + 35?", "What is 94 - 17?", "Compute 17 + 59.", "What is 82 plus 3?", "What is 2 + 3?",
              "Put the letters of gigise in alphabetical order."]
FOLLOW_UP = "What is 3 + 4?"
MAX_TOKENS = 8  # the micro models may not stop before the context does: a second turn must still fit

pytestmark = pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                                reason=f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver")

# every text the last assistant message is given, as the page sets it (a callback sees each mutation record, so
# deltas rendered within one task are all seen)
RECORD_LENGTHS = """
window.seenLengths = [];
new MutationObserver((records) => {
  for (const r of records)
    if (r.target.classList && r.target.classList.contains("assistant"))
      for (const n of r.addedNodes) if (n.nodeType === Node.TEXT_NODE) window.seenLengths.push(n.data.length);
}).observe(document.getElementById("messages"), {childList: true, subtree: true});
"""

# Stop pressed as soon as the first delta is shown (in the page, so no round trip of the driver races the stream)
STOP_AT_FIRST_DELTA = """
new MutationObserver((records, observer) => {
  const reply = document.querySelector(".message.assistant");
  if (reply && reply.textContent) { observer.disconnect(); document.getElementById("stop").click(); }
}).observe(document.getElementById("messages"), {childList: true, subtree: true});
"""


@pytest.fixture(scope="module")
def server(micro_chain, tmp_path_factory):
    s = Server(chain_copy(micro_chain, tmp_path_factory.mktemp("served")), "--stage", "aligned").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,700",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield d
    d.quit()


@pytest.fixture
def page(driver, server):
    """The chat page freshly loaded, its checkpoint list filled in."""
    driver.get(server.url + "/")
    wait(driver, lambda d: d.find_elements("css selector", "#model option"))
    return driver


def wait(driver, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def el(driver, id_: str):
    return driver.find_element("id", id_)


def texts(driver, selector: str) -> list[str]:
    return driver.execute_script(f"return [...document.querySelectorAll({selector!r})].map(e => e.textContent)")


def idle(driver, asked: int) -> None:
    """Wait until the page has sent `asked` questions and is no longer streaming."""
    wait(driver, lambda d: len(d.find_elements("css selector", ".message.user")) == asked
         and el(d, "send").is_enabled() and not el(d, "stop").is_enabled())


def ask(driver, question: str) -> None:
    from selenium.webdriver.common.keys import Keys
    box = el(driver, "input")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)


def type_into(driver, id_: str, text: str) -> None:
    field = el(driver, id_)
    field.clear()
    field.send_keys(text)


def reference(client: openai.OpenAI, messages: list[dict]):
    return client.chat.completions.create(model="aligned", messages=messages, temperature=0, max_tokens=MAX_TOKENS)


def several_tokens(client: openai.OpenAI) -> tuple[str, str]:
    """The first candidate question whose reply (at temperature 0) is two tokens or more before the end token."""
    for question in CANDIDATES:
        r = reference(client, [{"role": "user", "content": question}])
        if r.usage.completion_tokens >= 3:
            break
    return question, r.choices[0].message.content


def test_the_page_lists_the_checkpoints(page, client):
    served = [m.id for m in client.models.list().data]
    options = page.execute_script("return [...document.querySelectorAll('#model option')].map(o => o.value)")
    assert options == served and "aligned" in served and len(served) >= 2
    assert el(page, "model").get_attribute("value") == served[0] == "aligned"  # the server's default, listed first
    assert float(el(page, "temperature").get_attribute("value")) == 0.7
    assert el(page, "max-tokens").get_attribute("value") == ""  # left out of requests: the server's own limit
    assert not el(page, "send").get_attribute("disabled") and el(page, "stop").get_attribute("disabled")


def test_a_reply_streams_in_and_ends_as_the_server_answers_turn_after_turn(page, client):
    question, expected = several_tokens(client)
    type_into(page, "temperature", "0")
    assert el(page, "temperature-range").get_attribute("value") == "0"
    type_into(page, "max-tokens", str(MAX_TOKENS))
    page.execute_script(RECORD_LENGTHS)
    ask(page, question)
    assert not el(page, "send").is_enabled()  # at once: Send waits while the reply streams
    idle(page, 1)
    assert texts(page, ".message.user") == [question]
    assert texts(page, ".message.assistant") == [expected]
    seen = [n for n in page.execute_script("return window.seenLengths") if n]
    assert len(set(seen)) > 1, f"the reply {expected!r} was rendered whole, not as it streamed: lengths {seen}"
    assert seen == sorted(seen) and seen[-1] == len(expected)  # it only grew, to the whole reply
    assert "stop" in el(page, "status").text or "length" in el(page, "status").text

    # the second turn is asked in the context of the first, as the API would be asked
    ask(page, FOLLOW_UP)
    idle(page, 2)
    conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": expected},
                    {"role": "user", "content": FOLLOW_UP}]
    assert texts(page, ".message.assistant") == [expected, reference(client, conversation).choices[0].message.content]

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert page.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and SCREENSHOT.stat().st_size > 10_000


def test_shift_enter_is_a_new_line_and_reset_clears_the_conversation(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    box = el(page, "input")
    box.send_keys("What is 1 + 1?")
    ActionChains(page).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    box.send_keys("Thanks.")
    assert box.get_attribute("value") == "What is 1 + 1?\nThanks."
    assert not page.find_elements("css selector", ".message")  # not sent
    box.send_keys(Keys.ENTER)
    idle(page, 1)
    assert len(page.find_elements("css selector", ".message.assistant")) == 1
    el(page, "reset").click()
    assert not page.find_elements("css selector", "#messages .message")
    assert page.execute_script("return conversation.length") == 0 and el(page, "status").text == ""


def test_stop_ends_the_stream_and_keeps_what_came(page, client):
    from selenium.webdriver.support.ui import Select

    full = client.chat.completions.create(model="pretrain", messages=[{"role": "user", "content": "Tell me a story."}],
                                          temperature=0)
    assert full.choices[0].finish_reason == "length"  # pretraining never saw the end token: it talks to the context
    Select(el(page, "model")).select_by_value("pretrain")
    type_into(page, "temperature", "0")
    page.execute_script(STOP_AT_FIRST_DELTA)
    ask(page, "Tell me a story.")
    idle(page, 1)
    assert el(page, "status").text == "stopped"
    (partial,) = texts(page, ".message.assistant")
    whole = full.choices[0].message.content
    assert partial and whole.startswith(partial) and len(partial) < len(whole)
    assert page.execute_script("return conversation")[1] == {"role": "assistant", "content": partial}


@pytest.mark.parametrize("bad", ["unknown model", "prompt past the context"])
def test_a_bad_request_shows_the_servers_error_and_the_server_serves_on(page, server, client, bad):
    if bad == "unknown model":
        page.execute_script("const s = document.getElementById('model'); s.add(new Option('nope', 'nope')); "
                            "s.value = 'nope';")
        question, status, words = "What is 2 + 3?", "404", "'nope' does not exist"
    else:
        context = next(m for m in httpx.get(server.url + "/v1/models").json()["data"] if m["id"] == "aligned")
        question, status, words = "1 " * context["context_length"], "400", "context is"
    ask(page, question)
    wait(page, lambda d: "error" in el(d, "status").get_attribute("class"))
    shown = el(page, "status").text
    assert status in shown and words in shown, shown
    assert not page.find_elements("css selector", ".message.assistant")
    assert page.find_elements("css selector", ".message.user.failed")  # the question left the conversation
    assert page.execute_script("return conversation.length") == 0 and el(page, "send").is_enabled()
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok" and server.alive()
