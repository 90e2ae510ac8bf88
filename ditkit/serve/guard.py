"""What the server refuses before it samples: host names it does not answer to (DNS rebinding),
other sites' pages, bodies that are not small flat JSON; and error messages that quote bad input
briefly."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from ..config import ServeConfig

QUOTE = 40  # characters of a bad value an error message quotes back


class Refused(Exception):
    """A request the server does not take: an HTTP status and one sentence."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


# -- what the server answers to ------------------------------------------------------------------
def host_name(header: str) -> str:
    """The Host header without its port, lower case: "[::1]:7860" -> "::1"."""
    name = header[1 : header.find("]")] if header.startswith("[") else header.rsplit(":", 1)[0]
    return name.lower().rstrip(".")


def address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


@dataclass(frozen=True)
class Hosts:
    """The host names a server answers to. DNS rebinding points another site's name at this machine,
    so that site's pages reach the server with their own name in Host: only names that are this
    server's are taken. Listening on loopback: localhost and loopback addresses. Listening on other
    addresses: any address (an address cannot be rebound), localhost, this machine's name and the
    address listened on. And --allow-host's names (a DNS name or a reverse proxy's) everywhere."""

    loopback: bool
    names: frozenset[str]
    any_name: bool

    @classmethod
    def of(cls, cfg: ServeConfig) -> Hosts:
        host = cfg.host.lower()
        loopback = host == "localhost" or bool((a := address(host)) and a.is_loopback)
        names = {"localhost", *(h.lower() for h in cfg.allow_host)}
        if not loopback:
            names |= {host, socket.gethostname().lower()}
        return cls(loopback, frozenset(names), "*" in cfg.allow_host)

    def __contains__(self, name: str) -> bool:
        if self.any_name or name in self.names:
            return True
        ip = address(name)
        return ip is not None and (ip.is_loopback or not self.loopback)


def clip(value, n: int = QUOTE) -> str:
    """At most `n` characters of a value quoted back to a client."""
    text = str(value)
    return text if len(text) <= n else text[: n - 1] + "…"


# A list repr, a quoted string repr, or any other word: what an error message may quote at length.
_QUOTED = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""
_TOKEN = re.compile(rf"\[(?:{_QUOTED}|[^\[\]'\"])*\]|{_QUOTED}|\S+")


def _cut(token: str) -> str:
    if len(token) <= QUOTE:
        return token
    end = {"'": "'", '"': '"', "[": "]"}.get(token[0], "")
    return token[: QUOTE - 1 - len(end)] + "…" + end


def api_message(error: Exception) -> str:
    """One sentence for the API: the first line, flags named as the API's fields (--num-sampling-steps
    -> num_sampling_steps), and every quoted value, list or word over a few dozen characters cut short."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), text)
    text = _TOKEN.sub(lambda m: _cut(m.group()), text)
    return text if len(text) <= 10 * QUOTE else text[: 10 * QUOTE - 1] + "…"  # many short words: still a sentence, not a page


async def read_body(request, limit: int) -> bytes:
    """The body, read in chunks and given up on as soon as it passes `limit` bytes."""
    too_large = Refused(413, f"the request body is over this server's limit of {limit} bytes (--max-body); send fewer or shorter values.",
                        {"Connection": "close"})  # fmt: skip
    length = request.headers.get("content-length", "")
    if length.isdigit() and (len(length) > 12 or int(length) > limit):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)
