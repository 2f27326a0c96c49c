"""HTTP health probes (``config.health``) and http actions (`actions:` of kind http) through aiohttp.

A probe's URL comes from the config only (validated when it loads), never from what someone typed;
an action's URL is the config's template with each checked value percent-encoded as one segment.
Redirects are not followed (a probe that answers 301 says so), no proxy from the environment is
used, no cookies are kept, and at most ``max_bytes`` of the (decompressed) body are read. Each GET
is bounded as a whole — connect, DNS, headers, body — by its ``timeout``; trouble is returned as
``ProbeResponse.error``, never raised, so one probe that is down does not hide the others.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from bot.errors import BackendUnavailable, ExecutionError, OutcomeUnknown
from bot.ports import ProbeResponse

USER_AGENT = "opsbot-health-probe"
ACTION_USER_AGENT = "opsbot-action"
MAX_CONNECTIONS = 32


class HttpProbeAdapter:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._actions: aiohttp.ClientSession | None = None

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

    def _action_client(self) -> aiohttp.ClientSession:
        """A session of its own for http actions: a new connection per request (``force_close``), so a
        stale kept-alive connection can never make aiohttp send a PUT or DELETE a second time (it
        retries idempotent methods on a reused connection that broke); the trace guard below refuses
        any second attempt anyway."""
        if self._actions is None or self._actions.closed:
            trace = aiohttp.TraceConfig()
            trace.on_connection_create_start.append(_on_attempt)
            trace.on_connection_reuseconn.append(_on_attempt)
            trace.on_request_headers_sent.append(_on_headers_sent)
            self._actions = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, force_close=True, ttl_dns_cache=30),
                headers={"User-Agent": ACTION_USER_AGENT, "Accept": "application/json, text/plain;q=0.9, */*;q=0.5"},
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, trace_configs=[trace])
        return self._actions

    async def send(self, method: str, url: str, *, headers: dict[str, str], body: bytes | None, timeout: float,
                   max_bytes: int) -> ProbeResponse:
        """One request of an http action: sent once, never retried (the Idempotency-Key makes a retry by a
        person safe, not one by opsbot). Nothing sent → BackendUnavailable (ExecutionError when the
        request itself cannot be built); sent and no status within ``timeout`` → OutcomeUnknown. A status
        whose body did not all arrive in time is returned with what came and ``error`` saying so."""
        started = time.monotonic()
        host = urlsplit(url).netloc
        attempt = _Attempt()
        resp: aiohttp.ClientResponse | None = None
        read = bytearray()
        try:
            # The URL is sent as rendered: encoded=True keeps `%2F` as it is and stops yarl from resolving
            # `..` (the command percent-encoded every value already).
            target = URL(url, encoded=True) if url.isascii() else URL(url)
            async with asyncio.timeout(timeout):
                resp = await self._action_client().request(
                    method, target, headers=headers, data=body, allow_redirects=False, trace_request_ctx=attempt,
                    # no body: no made-up `Content-Type: application/octet-stream` either
                    skip_auto_headers=() if body is not None else ("Content-Type",),
                    timeout=aiohttp.ClientTimeout(total=timeout + 1))  # the asyncio bound above is the one that counts
                async for chunk in resp.content.iter_chunked(16384):
                    read += chunk
                    if len(read) > max_bytes:
                        break
        except TimeoutError as exc:
            if resp is not None:
                return _answer(resp, read, max_bytes, started, error=f"the rest of the body did not arrive within {timeout:g} s")
            if not attempt.sent:
                raise BackendUnavailable(f"the HTTP API at {host}", f"no connection within {timeout:g} s; nothing was sent") from exc
            raise OutcomeUnknown(f"{method} to {host}: no answer within {timeout:g} s. The request was sent and may have been "
                                 "acted on; look before trying again (a retry of this request carries the same "
                                 "Idempotency-Key, which an API that honours it does not act on twice).") from exc
        except aiohttp.ClientConnectorError as exc:  # no connection: nothing was sent
            reason = exc.os_error.strerror if exc.os_error and exc.os_error.strerror else str(exc.os_error or exc)
            raise BackendUnavailable(f"the HTTP API at {host}", f"cannot connect: {reason}; nothing was sent") from exc
        except _SecondAttempt as exc:
            raise OutcomeUnknown(f"{method} to {host}: the connection broke after the request was sent; it may have been "
                                 "acted on, and opsbot does not send it again. Look before trying again.") from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            detail = f"{type(exc).__name__}: {str(exc).strip()}"[:200]
            if resp is not None:
                return _answer(resp, read, max_bytes, started, error=f"the body broke off ({detail})")
            if attempt.sent:
                raise OutcomeUnknown(f"{method} to {host}: the connection failed after the request was sent ({detail}); it "
                                     "may have been acted on. Look before trying again.") from exc
            if isinstance(exc, ValueError):  # a URL or header aiohttp refuses to put on the wire
                raise ExecutionError(f"the request to {host} could not be built ({detail}); nothing was sent.") from exc
            raise BackendUnavailable(f"the HTTP API at {host}", f"{detail}; nothing was sent") from exc
        finally:
            if resp is not None:
                resp.release()
        return _answer(resp, read, max_bytes, started)

    async def close(self) -> None:
        for session in (self._session, self._actions):
            if session is not None:
                await session.close()
        self._session = self._actions = None


class _Attempt:
    """What one action request did on the wire (its ``trace_request_ctx``)."""

    def __init__(self) -> None:
        self.connections = 0
        self.sent = False  # the request line and headers were written: the server may act on it


class _SecondAttempt(Exception):
    pass


async def _on_attempt(session: aiohttp.ClientSession, ctx: Any, params: Any) -> None:
    attempt = ctx.trace_request_ctx
    if isinstance(attempt, _Attempt):
        attempt.connections += 1
        if attempt.connections > 1:  # aiohttp is about to send it again (a broken connection): never
            raise _SecondAttempt()


async def _on_headers_sent(session: aiohttp.ClientSession, ctx: Any, params: Any) -> None:
    if isinstance(ctx.trace_request_ctx, _Attempt):
        ctx.trace_request_ctx.sent = True


def _answer(resp: aiohttp.ClientResponse, read: bytearray, max_bytes: int, started: float, *, error: str = "") -> ProbeResponse:
    try:
        text = bytes(read[:max_bytes]).decode(resp.charset or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        text = bytes(read[:max_bytes]).decode("utf-8", "replace")
    return ProbeResponse(status=resp.status, seconds=time.monotonic() - started, content_type=resp.content_type, body=text,
                         truncated=len(read) > max_bytes or bool(error), error=error)
