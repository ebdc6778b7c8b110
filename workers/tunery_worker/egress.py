"""Requests a worker makes for a tenant: which teacher hosts it may reach, and how.

A tenant names its teacher endpoint (`teacher.base_url`) and the worker calls it with the tenant's
key. Unchecked, that lets a tenant make the worker reach anything the worker can: the cloud
metadata service, the Tunery server's loopback port, hosts on the worker's private network (SSRF).
The policy, applied to every connection a teacher client opens:

- `TUNERY_TEACHER_ALLOWED_HOSTS` (comma-separated host names or IP literals; `*.example.com` for any
  subdomain of example.com): when set, only those hosts are reached, at whatever address they
  resolve to, since the operator vouches for them. Unset: any host, at public addresses only.
- The host is resolved once per request, every address it resolves to is checked, and the
  connection goes to the checked address (the Host header, TLS SNI and certificate check keep the
  name), so a second DNS answer cannot slip in between the check and the connect (rebinding).
- Redirects are never followed, and errors say only a status code or a fixed phrase: nothing the
  endpoint answered is repeated to the tenant.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from tunery_worker.errors import InvalidConfig

ALLOWED_HOSTS_ENV = "TUNERY_TEACHER_ALLOWED_HOSTS"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 prefixes that carry an IPv4 address, which is what the packet finally reaches.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class EgressDenied(InvalidConfig):
    """The teacher URL names a host this worker's egress policy does not reach; retrying cannot help."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, NAT64, 6to4 or Teredo IPv6 address, if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def is_public_address(ip: IPAddress) -> bool:
    """Globally routable unicast: not loopback, private, link-local, CGNAT, unique-local, multicast,
    unspecified, reserved or documentation space (nor an IPv6 form of such an IPv4 address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None and not is_public_address(inner):
            return False
    # `is_global` already excludes private, CGNAT (100.64/10), unique-local (fc00::/7), loopback and
    # link-local space; the rest are listed because some of them count as "global" in `ipaddress`.
    return ip.is_global and not (
        ip.is_multicast or ip.is_unspecified or ip.is_reserved or ip.is_loopback or ip.is_link_local
    )


def _normalize_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


@dataclass(frozen=True)
class EgressPolicy:
    """Which teacher hosts this worker reaches; empty `allowed_hosts` means public addresses only."""

    allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EgressPolicy:
        raw = (os.environ if env is None else env).get(ALLOWED_HOSTS_ENV, "")
        return cls(tuple(h for h in (_normalize_host(part) for part in raw.split(",")) if h))

    def lists(self, host: str) -> bool:
        """Whether the operator's allow-list names `host` (exactly, or by a `*.suffix` entry)."""
        host = _normalize_host(host)
        for entry in self.allowed_hosts:
            if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
                return True
        return False

    def resolve(self, host: str, port: int) -> str:
        """The address to connect to for `host`, after checking it; `EgressDenied` when not allowed.

        DNS failures raise `httpx.ConnectError`: they may be transient, so they are retried.
        """
        listed = self.lists(host)
        if self.allowed_hosts and not listed:
            raise _denied(host)
        try:
            infos = socket.getaddrinfo(_normalize_host(host), port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as err:
            raise httpx.ConnectError("name resolution failed") from err
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addresses:
            raise httpx.ConnectError("name resolution failed")
        # Every address must pass: a name with one private address among public ones is refused.
        if not listed and not all(is_public_address(ip) for ip in addresses):
            raise _denied(host)
        return str(addresses[0])


def _denied(host: str) -> EgressDenied:
    # One message whether the host is unlisted, private or loopback: the answer maps nothing out.
    return EgressDenied(
        f"teacher.base_url: this worker does not reach host {host!r} (it reaches public addresses "
        f"only, or only the hosts its operator lists in {ALLOWED_HOSTS_ENV})",
        param="teacher.base_url",
    )


class PinnedTransport(httpx.BaseTransport):
    """Sends each request to the address the policy checked, keeping the host name for TLS and Host."""

    def __init__(self, policy: EgressPolicy, inner: httpx.BaseTransport | None = None) -> None:
        self.policy = policy
        self.inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host, scheme = request.url.host, request.url.scheme
        address = self.policy.resolve(host, request.url.port or (443 if scheme == "https" else 80))
        if address != host:
            # The Host header was set from the URL when the request was built and stays the name;
            # `sni_hostname` makes TLS send, and verify the certificate against, the name too.
            request.url = request.url.copy_with(host=address)
            request.extensions = {**request.extensions, "sni_hostname": host}
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def check_teacher_url(url: str) -> str:
    """`url` if it is an http(s) URL without credentials; `InvalidConfig` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidConfig("teacher.base_url must be an http(s) URL", param="teacher.base_url")
    if parts.username is not None or parts.password is not None:
        raise InvalidConfig(
            "teacher.base_url may not carry credentials; give teacher_api_key instead",
            param="teacher.base_url",
        )
    return url


def teacher_client(
    base_url: str,
    headers: Mapping[str, str],
    timeout: float,
    policy: EgressPolicy | None = None,
) -> httpx.Client:
    """An HTTP client for a tenant's teacher endpoint, under this worker's egress policy."""
    return httpx.Client(
        base_url=check_teacher_url(base_url),
        headers=dict(headers),
        timeout=timeout,
        transport=PinnedTransport(policy or EgressPolicy.from_env()),
        follow_redirects=False,
        trust_env=False,  # no proxy from the environment: the pinned address is what is reached
    )


def describe_response(response: httpx.Response) -> str:
    """What an error may say about a teacher's answer: its status code, never its body."""
    return f"HTTP {response.status_code}"


def describe_transport_error(err: httpx.TransportError) -> str:
    """What an error may say about a failed connection: a fixed phrase per kind of failure."""
    return "timed out" if isinstance(err, httpx.TimeoutException) else "connection failed"
