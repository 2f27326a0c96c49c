"""HTTP health probes (``config.health``) and http actions (`actions:` of kind http) through aiohttp.

The URLs come from the config only (validated when it loads), never from what someone typed.
Redirects are not followed (a probe that answers 301 says so), no proxy from the environment is
used, no cookies are kept, and at most ``max_bytes`` of the (decompressed) body are read. Each GET
is bounded as a whole — connect, DNS, headers, body — by its ``timeout``; trouble is returned as
``ProbeResponse.error``, never raised, so one probe that is down does not hide the others.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import aiohttp

from bot.errors import BackendUnavailable, OutcomeUnknown
from bot.ports import ProbeResponse

USER_AGENT = "opsbot-health-probe"
MAX_CONNECTIONS = 32


class HttpProbeAdapter:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=8, ttl_dns_cache=30),
                headers={"User-Agent": USER_AGENT, "Accept": "application/json, text/plain;q=0.9, */*;q=0.5"},
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        return self._session

    async def get(self, url: str, *, timeout: float, max_bytes: int) -> ProbeResponse:
        started = time.monotonic()
        answered = started
        try:
            async with asyncio.timeout(timeout):
                async with self._client().get(url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    answered = time.monotonic()
                    body = bytearray()
                    async for chunk in resp.content.iter_chunked(16384):
                        body += chunk
                        if len(body) > max_bytes:
                            break
                    try:
                        text = bytes(body[:max_bytes]).decode(resp.charset or "utf-8", "replace")
                    except LookupError:  # a charset Python does not know
                        text = bytes(body[:max_bytes]).decode("utf-8", "replace")
                    return ProbeResponse(status=resp.status, seconds=answered - started, content_type=resp.content_type,
                                         body=text, truncated=len(body) > max_bytes)
        except TimeoutError:
            what = "the body did not arrive" if answered > started else "no answer"
            return ProbeResponse(status=None, seconds=time.monotonic() - started, error=f"{what} within {timeout:g} s")
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror if exc.os_error and exc.os_error.strerror else str(exc.os_error or exc)
            return ProbeResponse(status=None, seconds=time.monotonic() - started, error=f"cannot connect: {reason}")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            detail = str(exc).strip() or type(exc).__name__
            return ProbeResponse(status=None, seconds=time.monotonic() - started, error=f"{type(exc).__name__}: {detail}"[:300])

    async def send(self, method: str, url: str, *, headers: dict[str, str], body: bytes | None, timeout: float,
                   max_bytes: int) -> ProbeResponse:
        """One request of an http action: sent once, never retried (the Idempotency-Key makes a retry by a
        person safe, not one by opsbot). Not sent → BackendUnavailable; sent, no answer → OutcomeUnknown."""
        started = time.monotonic()
        sent = False
        host = urlsplit(url).netloc
        try:
            async with asyncio.timeout(timeout):
                async with self._client().request(method, url, headers=headers, data=body, allow_redirects=False,
                                                  timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    sent = True
                    body_read = bytearray()
                    async for chunk in resp.content.iter_chunked(16384):
                        body_read += chunk
                        if len(body_read) > max_bytes:
                            break
                    text = bytes(body_read[:max_bytes]).decode("utf-8", "replace")
                    return ProbeResponse(status=resp.status, seconds=time.monotonic() - started, content_type=resp.content_type,
                                         body=text, truncated=len(body_read) > max_bytes)
        except aiohttp.ClientConnectorError as exc:  # no connection: nothing was sent
            reason = exc.os_error.strerror if exc.os_error and exc.os_error.strerror else str(exc.os_error or exc)
            raise BackendUnavailable(f"the HTTP API at {host}", f"cannot connect: {reason}; nothing was sent") from exc
        except TimeoutError as exc:
            if sent:
                return ProbeResponse(status=None, seconds=time.monotonic() - started,
                                     error=f"the answer's body did not arrive within {timeout:g} s")
            raise OutcomeUnknown(f"{method} {host}: no answer within {timeout:g} s. The request may have been received and "
                                 "acted on; look before trying again (a retry with the same request id is deduplicated "
                                 "by the Idempotency-Key, if the API honours it).") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise OutcomeUnknown(f"{method} {host}: the connection failed after the request was sent "
                                 f"({type(exc).__name__}); it may have been acted on. Look before trying again.") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
