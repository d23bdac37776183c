"""Whether the Hugging Face Hub can be reached: the check that makes offline fail fast.

When ``HF_HUB_OFFLINE`` is not set but the Hub endpoint cannot be reached (no network, a DNS
failure, a refused port, one that drops packets), huggingface_hub and ``datasets`` retry each
request for about 25 s before giving up. ``hub_reachable`` asks once per process and address,
with one TCP connection attempt bounded by ``CONNECT_TIMEOUT`` seconds (name lookup included);
``unreachable`` then tells ``hub`` and ``data`` to read their local caches only, as offline mode
would: what is cached loads at once, what is not is one line at once.
"""

from __future__ import annotations

import functools
import socket
import threading
import urllib.request
from urllib.parse import urlsplit

#: Seconds the one reachability check of a process may take (name lookup and TCP connect).
CONNECT_TIMEOUT = 2.0


def offline_mode() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check()) if callable(check) else bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_address() -> tuple[str, int]:
    """(host, port) a request to the Hub endpoint (``HF_ENDPOINT``) first connects to: the
    endpoint's, or its proxy's when the environment sets one for it."""
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if purl.hostname:
            return purl.hostname, purl.port or (443 if purl.scheme == "https" else 80)
    return host, port


def hub_reachable(timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether a TCP connection to the Hub endpoint (or its proxy) opens within ``timeout``
    seconds, name lookup included; asked once per process and address (cached)."""
    return _can_connect(*hub_address(), timeout)


@functools.lru_cache(maxsize=8)
def _can_connect(host: str, port: int, timeout: float) -> bool:
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:  # refused, unreachable, no such name, timed out
            result.append(False)

    # getaddrinfo ignores socket timeouts: a daemon thread bounds the whole attempt.
    worker = threading.Thread(target=attempt, name="attnflow-hub-check", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def unreachable() -> bool:
    """True when the Hub must be read from the local cache although offline mode is off: the
    endpoint cannot be reached (``hub_reachable``). Offline mode itself is never checked
    against the network."""
    return not offline_mode() and not hub_reachable()


def endpoint() -> str:
    """The Hub endpoint huggingface_hub talks to (``HF_ENDPOINT``, default huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT
