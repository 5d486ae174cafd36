"""The wire shapes: request bodies as spec §2 shows them, results as §3.2 quotes them."""

import pytest

from wanbatch.catalog import Protocol
from wanbatch.errors import ConfigError
from wanbatch.service.client import check_base_url
from wanbatch.service.wire import (
    MalformedAnswer,
    build_body,
    image_results,
    parse_service_time_s,
    result_prompts,
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
