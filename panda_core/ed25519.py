"""Ed25519 signature verification (RFC 8032, section 5.1.7) with the standard library alone.

Why it exists: a worker node has ``python3`` and not necessarily ``cryptography`` (a 16 MB
compiled package) nor an ``openssl`` that knows Ed25519. The batch script checks the pilot
file with this module's source (the factory pastes it in, so the node runs exactly this code),
and the pilot checks job specs and queue descriptions with it (pilot/signature.py). Verification
only: nothing here handles a secret, so constant time does not matter. Semantics are those of
OpenSSL and ``cryptography`` (cofactorless; ``S`` must be below the group order; ``R`` is
compared as bytes, so a non-canonical encoding fails). A verify costs ~2-3 ms of pure Python.

Stdlib only, no other module of this package: the source must run on its own.
"""
import hashlib

_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_D2 = 2 * _D % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_BY = 4 * pow(5, _P - 2, _P) % _P
_ZERO = (0, 1, 1, 0)                    # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z


class BadKey(ValueError):
    """Not an Ed25519 public key (wrong length, or not a point of the curve)."""


def _add(p, q):
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = t1 * _D2 * t2 % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _double(p):
    x1, y1, z1, _ = p
    a = x1 * x1 % _P
    b = y1 * y1 % _P
    c = 2 * z1 * z1 % _P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1)
    g = a - b
    f = c + g
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _decode(data: bytes):
    """The point a 32-byte encoding names; BadKey when it names none."""
    if len(data) != 32:
        raise BadKey(f"an Ed25519 point is 32 bytes, not {len(data)}")
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= _P:
        raise BadKey("not a canonical point encoding")
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
        if (x * x - x2) % _P:
            raise BadKey("not a point of the curve")
    if x == 0 and sign:
        raise BadKey("not a canonical point encoding")
    if x & 1 != sign:
        x = _P - x
    return x, y, 1, x * y % _P


def _encode(p) -> bytes:
    x, y, z, _ = p
    zi = pow(z, _P - 2, _P)
    x, y = x * zi % _P, y * zi % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


_B = _decode(_BY.to_bytes(32, "little"))


def _neg(p):
    x, y, z, t = p
    return -x % _P, y, z, -t % _P


def _double_scalar(s: int, k: int, a):
    """[s]B + [k]a in one pass over the bits (Straus), the cost of verification."""
    both = _add(_B, a)
    acc = _ZERO
    for i in range(max(s.bit_length(), k.bit_length()) - 1, -1, -1):
        acc = _double(acc)
        bits = (s >> i & 1, k >> i & 1)
        if bits == (1, 1):
            acc = _add(acc, both)
        elif bits == (1, 0):
            acc = _add(acc, _B)
        elif bits == (0, 1):
            acc = _add(acc, a)
    return acc


def verify(public_key: bytes, signature: bytes, message=None, *, chunks=None) -> bool:
    """True when ``signature`` (64 bytes) is the Ed25519 signature by ``public_key`` (32 raw
    bytes) of ``message`` (bytes), or of the concatenation of ``chunks`` (an iterable of bytes,
    for a file too large to hold). BadKey for an unusable key; False for any bad signature."""
    a = _decode(bytes(public_key))
    if len(signature) != 64:
        return False
    r_bytes, s = bytes(signature[:32]), int.from_bytes(signature[32:], "little")
    if s >= _L:
        return False
    digest = hashlib.sha512(r_bytes + bytes(public_key))
    for chunk in ([message] if chunks is None else chunks):
        digest.update(chunk)
    k = int.from_bytes(digest.digest(), "little") % _L
    return _encode(_double_scalar(s, k, _neg(a))) == r_bytes


def check_key(public_key: bytes) -> None:
    """BadKey unless ``public_key`` (32 raw bytes) is a point of the curve: what ``verify``
    would say of the key, at a tenth of a verification's cost."""
    _decode(bytes(public_key))


#: the DER SubjectPublicKeyInfo of an Ed25519 key, before its 32 key bytes (RFC 8410)
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def raw_public_key(der: bytes) -> bytes:
    """The 32 key bytes of an Ed25519 SubjectPublicKeyInfo (a PEM's body); BadKey otherwise."""
    if len(der) != 44 or not der.startswith(SPKI_PREFIX):
        raise BadKey("not an Ed25519 public key (SubjectPublicKeyInfo)")
    return der[12:]
