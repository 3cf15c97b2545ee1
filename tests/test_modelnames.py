"""Model-name normalisation must agree with Ollama (section 2 of the Ollama
API notes), otherwise the proxy sends a request to a node that lacks the
model, or refuses one that has it."""
from __future__ import annotations

import pytest

from aivonx.modelnames import (
    MAX_NAME_LEN,
    InvalidModelName,
    _canonical,
    canonical,
    namespace,
)

LLAMA3 = "registry.ollama.ai/library/llama3:latest"

# Every spelling Ollama resolves to the installed llama3:latest.
SAME_AS_LLAMA3 = [
    "llama3",
    "llama3:latest",
    "LLaMA3",
    "LLaMA3:Latest",
    "library/llama3",
    "library/llama3:latest",
    "Library/Llama3",
    "registry.ollama.ai/library/llama3",
    "registry.ollama.ai/library/llama3:latest",
    "REGISTRY.OLLAMA.AI/LIBRARY/LLAMA3:LATEST",
    " llama3:Latest ",
    "\tllama3\n",
    "\u00a0llama3\u3000",            # Go's TrimSpace also trims Unicode spaces
    "https://registry.ollama.ai/library/llama3",
    "http://registry.ollama.ai/library/llama3:latest",
    "llama3:cloud",                  # source suffix is stripped
    "llama3:CLOUD",
    "llama3:local",
    "llama3:Local",
    "llama3:latest:cloud",
    "llama3:latest-cloud",           # "-cloud" tag suffix: tag is "latest"
    "llama3:LATEST-Cloud",
    " library/llama3:local ",
]


@pytest.mark.parametrize("name", SAME_AS_LLAMA3)
def test_equivalent_spellings_share_one_key(name: str) -> None:
    assert canonical(name) == LLAMA3


CANONICAL = [
    ("llama3:8b", "registry.ollama.ai/library/llama3:8b"),
    ("LLaMA3:8B", "registry.ollama.ai/library/llama3:8b"),
    ("llama3.2:3b-instruct-q4_K_M", "registry.ollama.ai/library/llama3.2:3b-instruct-q4_k_m"),
    ("qwen2.5-coder:7b", "registry.ollama.ai/library/qwen2.5-coder:7b"),
    ("user/m:tag", "registry.ollama.ai/user/m:tag"),
    ("User/M", "registry.ollama.ai/user/m:latest"),
    ("my-ns/m", "registry.ollama.ai/my-ns/m:latest"),
    ("_ns/_m:_t", "registry.ollama.ai/_ns/_m:_t"),
    # the colon before the last "/" is a port, not a tag
    ("myhost:5000/ns/m", "myhost:5000/ns/m:latest"),
    ("myhost:5000/ns/m:v1", "myhost:5000/ns/m:v1"),
    ("MyHost:5000/NS/M:V1", "myhost:5000/ns/m:v1"),
    ("localhost:11434/library/m", "localhost:11434/library/m:latest"),
    ("hf.co/bartowski/X-GGUF:Q4_K_M", "hf.co/bartowski/x-gguf:q4_k_m"),
    ("h.example.com/ns/m", "h.example.com/ns/m:latest"),
    # an optional scheme on the host is dropped
    ("https://myhost:5000/ns/m:v1", "myhost:5000/ns/m:v1"),
    ("http://hf.co/a/b", "hf.co/a/b:latest"),
    # cloud/local source markers
    ("gpt-oss:20b-cloud", "registry.ollama.ai/library/gpt-oss:20b"),
    ("gpt-oss:20B-CLOUD", "registry.ollama.ai/library/gpt-oss:20b"),
    ("gpt-oss:20b:cloud", "registry.ollama.ai/library/gpt-oss:20b"),
    ("user/m:cloud", "registry.ollama.ai/user/m:latest"),
    ("myhost:5000/ns/m:local", "myhost:5000/ns/m:latest"),
    ("local", "registry.ollama.ai/library/local:latest"),      # no colon: a model
    ("cloud", "registry.ollama.ai/library/cloud:latest"),
    ("local:cloud", "registry.ollama.ai/library/local:latest"),
    ("cloud:local", "registry.ollama.ai/library/cloud:latest"),
    ("ns/m-cloud", "registry.ollama.ai/ns/m-cloud:latest"),     # only tags lose -cloud
    ("myhost:5000/ns/m-cloud", "myhost:5000/ns/m-cloud:latest"),
    ("m-cloud:7b", "registry.ollama.ai/library/m-cloud:7b"),
    # Ollama (HEAD) accepts consecutive dots inside model and tag
    ("a..b", "registry.ollama.ai/library/a..b:latest"),
    ("m:1..2", "registry.ollama.ai/library/m:1..2"),
]


@pytest.mark.parametrize(("name", "key"), CANONICAL)
def test_canonical(name: str, key: str) -> None:
    assert canonical(name) == key


DIFFERENT = [
    ("llama3", "llama3:8b"),
    ("llama3", "llama3.1"),
    ("llama3", "llama3-cloud"),
    ("llama3:8b", "llama3:8b-instruct"),
    ("library/llama3", "user/llama3"),
    ("registry.ollama.ai/library/llama3", "other.host/library/llama3"),
    ("myhost:5000/ns/m", "myhost/ns/m"),
    ("myhost:5000/ns/m", "myhost:5001/ns/m"),
    ("myhost:5000/ns/m", "ns/m"),
    ("hf.co/a/b:Q4_K_M", "hf.co/a/b:Q8_0"),
    ("a/b", "b/a"),
]


@pytest.mark.parametrize(("a", "b"), DIFFERENT)
def test_different_models_get_different_keys(a: str, b: str) -> None:
    assert canonical(a) != canonical(b)


DISPLAY = [
    ("llama3", "llama3:latest"),
    ("LLaMA3", "LLaMA3:latest"),                  # casing kept, like /api/tags
    (" llama3 ", "llama3:latest"),
    ("library/llama3:8b", "llama3:8b"),
    ("registry.ollama.ai/library/llama3", "llama3:latest"),
    ("REGISTRY.Ollama.AI/Library/x", "x:latest"),  # defaults matched case-insensitively
    ("user/m:tag", "user/m:tag"),
    ("registry.ollama.ai/user/m:tag", "user/m:tag"),
    ("host:5000/ns/m:tag", "host:5000/ns/m:tag"),
    ("host:5000/ns/m", "host:5000/ns/m:latest"),
    ("host:5000/library/m", "host:5000/library/m:latest"),  # host not default: keep ns
    ("hf.co/bartowski/X-GGUF:Q4_K_M", "hf.co/bartowski/X-GGUF:Q4_K_M"),
    ("https://hf.co/a/b", "hf.co/a/b:latest"),
    ("gpt-oss:20b-cloud", "gpt-oss:20b"),
    ("llama3:cloud", "llama3:latest"),
]


@pytest.mark.parametrize(("name", "shown"), DISPLAY)
def test_the_form_ollama_lists_routes_to_the_same_model(name: str, shown: str) -> None:
    """Requests are matched against /api/tags entries, which Ollama lists in
    their shortest display form."""
    assert canonical(shown) == canonical(name)


NAMESPACE = [
    ("llama3", "library"),
    ("registry.ollama.ai/library/llama3:8b", "library"),
    ("user/m", "user"),
    ("user/m:cloud", "user"),
    ("host:5000/ns/m:tag", "ns"),
    ("hf.co/bartowski/X-GGUF:Q4_K_M", "bartowski"),
    ("Library/x", "Library"),                      # as Ollama's ParseName reports it
]


@pytest.mark.parametrize(("name", "ns"), NAMESPACE)
def test_namespace(name: str, ns: str) -> None:
    assert namespace(name) == ns


VALID_SAMPLES = SAME_AS_LLAMA3 + [name for name, _ in CANONICAL]


@pytest.mark.parametrize("name", VALID_SAMPLES)
def test_a_key_is_its_own_canonical_form(name: str) -> None:
    """The proxy compares request names against canonicalised /api/tags
    entries, so canonicalising twice must change nothing."""
    key = canonical(name)
    assert canonical(key) == key
    assert key == key.lower()


INVALID = [
    "",
    " ",
    "\t\n ",
    # empty parts
    "a//b",
    "/m",
    "m/",
    "//m",
    ":tag",
    "m:",
    "ns/:tag",
    "ns/m:",
    # too many parts / colons
    "a/b/c/d",
    "a/b/c/d/e",
    "https://h/n/m/x",
    "a:b:c",
    "a:b:c:d",
    "host/ns/m:t:u",
    "ns/m:t/x",                    # colon before last "/" lands in the namespace
    "ns:1/m",                      # namespace may not contain ":"
    # characters and first characters
    "llama 3",
    "llama3 :latest",
    "ns/ m",
    "m\nx",
    "llama3\x00",
    "llama3\x1c",                  # str.strip() would drop it, Go's TrimSpace does not
    "llamä",
    "\uff4c\uff4c\uff41\uff4d\uff41",  # full-width letters
    "\u0662",                      # Arabic-Indic digit: not ASCII
    ".hidden",
    "-m",
    "m:-t",
    "m:.t",
    "ns.x/m",                      # no dots in the namespace
    "-ns/m",
    "-host/ns/m",
    ".host/ns/m",
    "m@sha256:abc",                # digests are not parsed
    "m+Q4_0",
    "m:t+Q4_0",
    "m;rm -rf",
    "m?x=1",
    "m#frag",
    "%2e%2e/etc",
    # path tricks
    "..",
    "../etc",
    "../../etc/passwd",
    "ns/..",
    "a/../b",
    "a/b/../c",
    "./m",
    "ns/.",
    "C:\\models\\m",
    "file:///etc/passwd",
    "https://llama3",
    "https://ns/m",
    # source suffixes
    "x:local:cloud",
    "x:cloud:local",
    "x:cloud:cloud",
    "x:20b-cloud:local",
    "x:20b-cloud:cloud",
    ":cloud",
    ":local",
    "m:-cloud",
    "-cloud",
    # lengths
    "x" * 600,
    " " * 600 + "llama3",          # over the limit before trimming
    "m" * 81,
    "n" * 81 + "/m",
    "m:" + "t" * 81,
    "h" * 351 + "/n/m",
    "h" * 350 + "/" + "n" * 80 + "/" + "m" * 80 + ":t",  # 513 characters
]


@pytest.mark.parametrize("name", INVALID)
@pytest.mark.parametrize("func", [canonical, namespace])
def test_invalid_names_are_rejected(func, name: str) -> None:
    with pytest.raises(InvalidModelName):
        func(name)


@pytest.mark.parametrize("value", [None, 3, b"llama3", ["llama3"], {"m": 1}])
@pytest.mark.parametrize("func", [canonical, namespace])
def test_non_strings_are_rejected(func, value: object) -> None:
    """Request bodies are untrusted JSON; a list must not reach the cache."""
    with pytest.raises(InvalidModelName):
        func(value)  # type: ignore[arg-type]


LIMITS = [
    ("m" * 80, "registry.ollama.ai/library/" + "m" * 80 + ":latest"),
    ("n" * 80 + "/m", "registry.ollama.ai/" + "n" * 80 + "/m:latest"),
    ("m:" + "t" * 80, "registry.ollama.ai/library/m:" + "t" * 80),
    ("h" * 350 + "/n/m", "h" * 350 + "/n/m:latest"),
    # exactly MAX_NAME_LEN characters
    ("h" * 350 + "/" + "n" * 80 + "/" + "m" * 80,
     "h" * 350 + "/" + "n" * 80 + "/" + "m" * 80 + ":latest"),
]


@pytest.mark.parametrize(("name", "key"), LIMITS)
def test_part_and_name_length_limits(name: str, key: str) -> None:
    assert len(name) <= MAX_NAME_LEN
    assert canonical(name) == key


def test_error_type_and_messages() -> None:
    assert issubclass(InvalidModelName, ValueError)
    with pytest.raises(InvalidModelName, match="model is required"):
        canonical("  ")
    with pytest.raises(InvalidModelName, match="not both"):
        canonical("x:local:cloud")
    with pytest.raises(InvalidModelName, match="invalid model name"):
        canonical("a//b")


def test_cache_is_bounded_and_used() -> None:
    assert _canonical.cache_info().maxsize == 4096
    _canonical.cache_clear()
    canonical("llama3")
    canonical("llama3")
    info = _canonical.cache_info()
    assert (info.hits, info.misses, info.currsize) == (1, 1, 1)
    for bad in ("x" * 10_000, "a//b", None):
        with pytest.raises(InvalidModelName):
            canonical(bad)  # type: ignore[arg-type]
    assert _canonical.cache_info().currsize == 1   # failures are never stored
