"""MessagePack serializer for Python patio 0.1.4, compatible with patio.h.

Python patio's TCP brokers pickle their payloads by default, which only
Python can read. Pass this serializer to both Python brokers and they speak
the MessagePack mapping of patio.h's PROTOCOL.md (section 7), so a Python
patio broker and a patio.h broker can call each other:

    from patio.broker.tcp import TCPClientBroker
    from patio_msgpack import MsgpackSerializer

    async with TCPClientBroker(executor, key=b"secret-key",
                               serializer=MsgpackSerializer()) as broker:
        await broker.connect(address="127.0.0.1", port=15383)
        print(await broker.call("mul", 1, 2, 3))       # 6

Mapping:

* None, bool, int (-2**63 .. 2**64-1), float (float64 out, float32 also
  read), str, bytes, list and tuple (arrays; read back as lists), dict (maps;
  keys may be any non-container value).
* ``CallRequest(func, args, kwargs, timeout)`` is ext type 1 over
  ``[func, args, kwargs, timeout]``.
* An exception is ext type 2 over ``[type name, message]``. A builtin is
  named by its bare class name (``KeyError``), any other class as
  ``module.QualName``. Decoding gives the builtin exception back for a bare
  builtin name; anything else (dotted names, unknown names, builtins that
  cannot be built from one string) becomes a ``RemoteError``, a
  ``RuntimeError`` that keeps both fields and encodes back to the same bytes.

Anything else fails with ``SerializationError`` (a ``ValueError``, so that
patio's brokers report it to the caller instead of dropping the worker).

Needs the ``msgpack`` package (Debian: python3-msgpack). Python patio itself
is optional: without it the module defines stand-ins for ``CallRequest`` and
``AbstractSerializer`` so that the mapping can be used and tested alone.
"""

from __future__ import annotations

import abc
import builtins
import dataclasses
from typing import Any, Dict, Optional, Tuple, Union

import msgpack

__all__ = (
    "CallRequest",
    "MsgpackSerializer",
    "RemoteError",
    "SerializationError",
    "EXT_CALL_REQUEST",
    "EXT_EXCEPTION",
    "exception_fields",
)

EXT_CALL_REQUEST = 1
EXT_EXCEPTION = 2


try:  # pragma: no cover - depends on what is installed
    from patio.broker.serializer import AbstractSerializer
except ImportError:  # patio is not installed: a stand-in with the same interface
    class AbstractSerializer(abc.ABC):  # type: ignore[no-redef]
        @abc.abstractmethod
        def pack(self, payload: Any) -> bytes:
            raise NotImplementedError

        @abc.abstractmethod
        def unpack(self, data: bytes) -> Any:
            raise NotImplementedError


CallRequest: Any
try:  # pragma: no cover - depends on what is installed
    from patio.broker.tcp.protocol import CallRequest
except ImportError:
    try:
        from patio.broker.tcp.broker import CallRequest  # older layouts
    except ImportError:
        @dataclasses.dataclass
        class CallRequest:  # type: ignore[no-redef]
            func: str
            args: Tuple[Any, ...]
            kwargs: Dict[str, Any]
            timeout: Optional[Union[int, float]]


class SerializationError(ValueError):
    """A payload that cannot be encoded or decoded with this mapping."""


class RemoteError(RuntimeError):
    """An exception from a peer that has no local builtin equivalent.

    ``type_name`` is the peer's name for it (``"myapp.QuotaExceeded"``) and
    ``message`` its message; encoding a RemoteError sends both unchanged.
    """

    def __init__(self, type_name: str, message: str = ""):
        self.type_name = type_name
        self.message = message
        super().__init__(f"{type_name}: {message}" if message else type_name)

    def __reduce__(self):  # keeps both fields through pickle/copy
        return (type(self), (self.type_name, self.message))


def exception_fields(exc: BaseException) -> Tuple[str, str]:
    """The (type name, message) pair an exception travels as."""
    if isinstance(exc, RemoteError):
        return exc.type_name, exc.message
    cls = type(exc)
    if cls.__module__ == "builtins":
        name = cls.__qualname__
    else:
        name = f"{cls.__module__}.{cls.__qualname__}"
    if not exc.args:
        message = ""
    elif len(exc.args) == 1 and isinstance(exc.args[0], str):
        message = exc.args[0]
    else:
        message = str(exc)
    return name, message


def _exception_from_fields(name: str, message: str) -> BaseException:
    if "." not in name:
        cls = getattr(builtins, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(message) if message else cls()
            except Exception:  # e.g. UnicodeDecodeError needs five arguments
                pass
    return RemoteError(name, message)


def _is_timestamp(value: Any) -> bool:
    return type(value) is msgpack.Timestamp


class MsgpackSerializer(AbstractSerializer):
    """patio serializer speaking MessagePack (PROTOCOL.md section 7)."""


    # ---- encoding ----------------------------------------------------------

    def _packb(self, obj: Any) -> bytes:
        return msgpack.packb(
            obj, default=self._default, use_bin_type=True,
            strict_types=False, use_single_float=False,
        )

    def _default(self, obj: Any) -> Any:
        if isinstance(obj, CallRequest):
            return self._call_request_ext(obj)
        if isinstance(obj, BaseException):
            name, message = exception_fields(obj)
            return msgpack.ExtType(EXT_EXCEPTION, self._packb([name, message]))
        if isinstance(obj, (bytearray, memoryview)):
            return bytes(obj)
        raise SerializationError(
            f"cannot serialize {type(obj).__qualname__!s} object",
        )

    def _call_request_ext(self, request: Any) -> msgpack.ExtType:
        func, args, kwargs = request.func, request.args, request.kwargs
        timeout = request.timeout
        if not isinstance(func, str):
            raise SerializationError("CallRequest.func must be a str")
        if kwargs is None:
            kwargs = {}
        if isinstance(timeout, bool) or not (
            timeout is None or isinstance(timeout, (int, float))
        ):
            raise SerializationError("CallRequest.timeout must be None or a number")
        body = self._packb([func, list(args or ()), dict(kwargs), timeout])
        return msgpack.ExtType(EXT_CALL_REQUEST, body)

    def pack(self, payload: Any) -> bytes:
        try:
            return self._packb(payload)
        except SerializationError:
            raise
        except (TypeError, ValueError, OverflowError) as e:
            raise SerializationError(str(e)) from e

    # ---- decoding ----------------------------------------------------------

    def _list_hook(self, items: list) -> list:
        for item in items:
            if _is_timestamp(item):
                raise SerializationError("ext type -1 (timestamp) is not supported")
        return items

    def _pairs_hook(self, pairs: list) -> dict:
        result = {}
        for key, value in pairs:
            if isinstance(key, (list, dict)):
                raise SerializationError("a map key may not be an array or a map")
            if _is_timestamp(key) or _is_timestamp(value):
                raise SerializationError("ext type -1 (timestamp) is not supported")
            result[key] = value
        return result

    def _ext_hook(self, code: int, data: bytes) -> Any:
        if code == EXT_CALL_REQUEST:
            return self._decode_call_request(data)
        if code == EXT_EXCEPTION:
            return self._decode_exception(data)
        raise SerializationError(f"unsupported ext type {code}")

    def _decode_call_request(self, data: bytes) -> Any:
        body = self._unpackb(data)
        if not isinstance(body, list) or len(body) != 4:
            raise SerializationError("CallRequest must be a 4-element array")
        func, args, kwargs, timeout = body
        if not isinstance(func, str):
            raise SerializationError("CallRequest func must be a str")
        if not isinstance(args, list):
            raise SerializationError("CallRequest args must be an array")
        if not isinstance(kwargs, dict) or not all(
            isinstance(k, str) for k in kwargs
        ):
            raise SerializationError("CallRequest kwargs must be a map of str")
        if isinstance(timeout, bool) or not (
            timeout is None or isinstance(timeout, (int, float))
        ):
            raise SerializationError("CallRequest timeout must be nil or a number")
        return CallRequest(
            func=func, args=tuple(args), kwargs=kwargs, timeout=timeout,
        )

    def _decode_exception(self, data: bytes) -> BaseException:
        body = self._unpackb(data)
        if (
            not isinstance(body, list) or len(body) != 2
            or not isinstance(body[0], str) or not isinstance(body[1], str)
        ):
            raise SerializationError("exception must be a [str, str] array")
        return _exception_from_fields(body[0], body[1])

    def _unpackb(self, data: bytes) -> Any:
        value = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=False,
            ext_hook=self._ext_hook, list_hook=self._list_hook,
            object_pairs_hook=self._pairs_hook,
        )
        if _is_timestamp(value):
            raise SerializationError("ext type -1 (timestamp) is not supported")
        return value

    def unpack(self, data: bytes) -> Any:
        try:
            return self._unpackb(bytes(data))
        except SerializationError:
            raise
        except Exception as e:  # msgpack raises several kinds: all mean "bad input"
            raise SerializationError(f"{type(e).__name__}: {e}") from e
