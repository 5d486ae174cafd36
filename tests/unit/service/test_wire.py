"""The wire shapes: request bodies as spec §2 shows them, results as §3.2 quotes them."""

import pytest

from wanbatch.catalog import Protocol
from wanbatch.errors import ConfigError
from wanbatch.service.client import check_base_url
from wanbatch.service.wire import (
    Anchor,
    MalformedAnswer,
    TaskStatus,
    build_body,
    image_results,
    list_page,
    parse_service_time_s,
    place_s,
    result_prompts,
    task_view,
    url_expires_s,
)

REQUEST = {
    "prompt": "a cat",
    "negative_prompt": "blurry",
    "size": "1024*1024",
    "n": 2,
    "seed": 42,
    "prompt_extend": True,
    "watermark": False,
}


def test_legacy_body_puts_negative_prompt_in_input():
    """The legacy protocol carries prompt and negative prompt in input, the rest in parameters."""
    body = build_body(REQUEST, api_name="wan2.2-t2i-flash", protocol=Protocol.LEGACY)
    assert body == {
        "model": "wan2.2-t2i-flash",
        "input": {"prompt": "a cat", "negative_prompt": "blurry"},
        "parameters": {"size": "1024*1024", "n": 2, "seed": 42, "prompt_extend": True, "watermark": False},
    }


def test_multimodal_body_puts_negative_prompt_in_parameters():
    """wan2.6 sends one user message with one text, and the negative prompt among the parameters."""
    body = build_body({**REQUEST, "seed": None}, api_name="wan2.6-t2i", protocol=Protocol.MULTIMODAL)
    assert body["input"] == {"messages": [{"role": "user", "content": [{"text": "a cat"}]}]}
    assert body["parameters"]["negative_prompt"] == "blurry"
    assert "seed" not in body["parameters"]


def test_partial_failure_results_keep_the_good_image():
    """A SUCCEEDED legacy task with one failed element yields one URL and one failed image, in order."""
    output = {
        "task_status": "SUCCEEDED",
        "results": [
            {"url": "https://x/a1.png", "orig_prompt": "p", "actual_prompt": "q"},
            {"code": "InternalError.Timeout", "message": "An internal timeout error has occurred"},
        ],
    }
    good, bad = image_results(output)
    assert (good.index, good.url, good.actual_prompt) == (0, "https://x/a1.png", "q")
    assert (bad.index, bad.url, bad.code) == (1, None, "InternalError.Timeout")


def test_wan26_choices_are_images():
    """wan2.6's choices[].message.content[].image are read as the task's images."""
    output = {
        "choices": [
            {
                "finish_reason": "stop",
                "message": {
                    "role": "assistant",
                    "content": [
                        {"image": "https://x/1.png?Expires=1700000000", "type": "image"},
                        {"image": "https://x/2.png", "type": "image"},
                    ],
                },
            }
        ]
    }
    assert [r.url for r in image_results(output)] == ["https://x/1.png?Expires=1700000000", "https://x/2.png"]
    assert url_expires_s(output["choices"][0]["message"]["content"][0]["image"]) == 1700000000.0


def test_an_expires_that_is_no_time_makes_the_answer_malformed():
    """An Expires that overflows, is not finite, or lies past any real date makes the answer one to ask for
    again, not a value the ledger's integers cannot hold; none gives None, a real one is read as it is."""
    for garbled in ("1e400", "inf", "-inf", "nan", "1e30", "-5", "soon"):
        with pytest.raises(MalformedAnswer, match="Expires"):
            url_expires_s(f"https://x/1.png?Expires={garbled}&Signature=s")
    assert url_expires_s("https://x/1.png?Expires=1700000000&Signature=s") == 1700000000.0
    assert url_expires_s("https://x/1.png") is None


def test_result_prompts_are_read_only_where_they_are_text():
    """orig_prompt values that are lists, objects or numbers are left out, not raised on."""
    results = [{"orig_prompt": ["a"]}, {"orig_prompt": {"b": 1}}, {"orig_prompt": 3}, "x", {"orig_prompt": "c"}]
    assert result_prompts({"results": results}) == {"c"}
    assert result_prompts({"results": "nope"}) == set() == result_prompts({})


def test_service_time_is_utc_plus_8():
    """ "2024-03-01 17:38:24.817" is 09:38:24.817 UTC, as the capture's Date header shows."""
    assert parse_service_time_s("2024-03-01 17:38:24.817") == 1709285904.817
    assert parse_service_time_s("not a time") is None


def test_key_never_goes_over_plain_http_to_a_remote_host():
    """Plain HTTP is refused for anything but loopback; HTTPS and loopback pass."""
    assert check_base_url("https://dashscope.aliyuncs.com/api/v1/") == "https://dashscope.aliyuncs.com/api/v1"
    assert check_base_url("http://127.0.0.1:8080/api/v1") == "http://127.0.0.1:8080/api/v1"
    assert check_base_url("http://[::1]:8080/api/v1")
    for bad in ("http://dashscope.aliyuncs.com/api/v1", "ftp://x/api", "http://10.0.0.5/api/v1"):
        try:
            check_base_url(bad)
        except ConfigError as exc:
            assert "http" in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")


#: 2024-03-01 17:38:24.817 in UTC+8, as epoch seconds on the service's clock
SUBMIT_S = 1709285904.817


def test_a_task_views_times_are_placed_on_our_clock_from_its_submission():
    """The service's submit time is the moment our create was sent: every other time of the answer, a URL's
    Expires included, keeps its distance from it, however far the two clocks disagree."""
    data = {
        "request_id": "r-1",
        "output": {
            "task_status": "SUCCEEDED",
            "submit_time": "2024-03-01 17:38:24.817",
            "scheduled_time": "2024-03-01 17:38:25.817",
            "end_time": "2024-03-01 17:38:34.817",
            "results": [{"url": f"https://x/1.png?Expires={int(SUBMIT_S) + 3600}", "orig_prompt": "a cat"}],
        },
        "usage": {"size": "1024x1024"},
    }
    view = task_view(data, sent_s=500.0, now_s=900.0)
    assert view.status is TaskStatus.SUCCEEDED and view.request_id == "r-1"
    assert (view.started_s, view.ended_s, view.running_s) == pytest.approx((501.0, 510.0, 9.0))
    assert view.results[0].expires_s == pytest.approx(500.0 + 3600 - 0.817)
    assert view.prompts == {"a cat"} and view.size == "1024*1024"


def test_without_a_submit_time_a_tasks_end_is_taken_as_now():
    """A sync answer has no anchor but its end: the answer cannot be older than now, so the end is now."""
    output = {"end_time": "2024-03-01 17:38:34.817", "results": [{"url": "https://x/1.png"}]}
    view = task_view({"output": output}, sent_s=None, now_s=42.0, sync=True)
    assert view.status is TaskStatus.SUCCEEDED and view.ended_s == 42.0 and view.started_s is None


@pytest.mark.parametrize(
    "data",
    [
        None,
        {"output": "no"},
        {"output": {"task_status": 7}},
        {"output": {"task_status": "SUSPENDED"}},
        {"output": {"task_status": "SUCCEEDED", "results": "garbled"}},
    ],
)
def test_an_unreadable_task_answer_is_malformed(data):
    """No status, a status that is none of the service's, or a SUCCEEDED task's results unreadable: asked again."""
    with pytest.raises(MalformedAnswer):
        task_view(data, sent_s=0.0, now_s=0.0)


def test_statuses_are_read_whatever_the_spelling_of_canceled():
    """CANCELLED (the SDK's spelling) is CANCELED; open and unbilled statuses say so; others read as None."""
    assert TaskStatus.read("CANCELLED") is TaskStatus.CANCELED and TaskStatus.CANCELED.unbilled
    assert TaskStatus.PENDING.is_open and TaskStatus.RUNNING.is_open and not TaskStatus.UNKNOWN.is_open
    assert not TaskStatus.SUCCEEDED.unbilled and TaskStatus.read("SUSPENDED") is None and TaskStatus.read(3) is None


def test_a_list_page_keeps_its_readable_rows_and_says_whether_it_is_whole():
    """Rows without a task id or a status are left out, and the page is then not whole; nor is one without a
    readable page count. A row's times are placed on our clock through its creation."""
    rows = [
        {"task_id": "t-1", "status": "RUNNING", "gmt_create": 1_000_000, "start_time": 1_002_000},
        {"task_id": "t-2", "status": "SUCCEEDED", "gmt_create": 1_000_000, "end_time": 1_000_000 + 10**12},
        {"status": "RUNNING"},
    ]
    page = list_page({"data": rows, "total_page": 1})
    assert [row.task_id for row in page.rows] == ["t-1", "t-2"] and page.raw_rows == 3 and not page.whole
    assert list_page({"data": rows[:2], "total_page": True}).total_pages is None
    assert list_page({"data": rows[:2], "total_page": 1}).whole
    first, second = page.rows
    assert first.status is TaskStatus.RUNNING and first.on_our_clock(first.started_s, sent_s=50.0) == 52.0
    assert second.on_our_clock(second.ended_s, sent_s=50.0) is None  # later than any task lives: garbled


def test_a_service_time_is_placed_through_one_shared_moment():
    """place_s keeps a time's distance from the anchor; with no anchor or no time there is nothing to place."""
    assert place_s(110.0, Anchor(ours_s=5.0, service_s=100.0)) == 15.0
    assert place_s(None, Anchor(ours_s=5.0, service_s=100.0)) is None and place_s(1.0, None) is None
