"""AES-SIV (RFC 5297) for many plaintexts at once: the same bytes as ``cryptography``'s ``AESSIV``,
at the speed of AES.

``AESSIV.encrypt`` costs microseconds of Python per call, and ingest encrypts millions of identifiers.
Here S2V (CMAC) and CTR run for a whole batch in lockstep: each block position of every plaintext goes
through one AES-ECB call of ``cryptography`` (OpenSSL), and the XORs, the GF(2^128) doubling and the
counters are numpy array operations. Nothing is invented: the construction is RFC 5297's and the block
cipher is OpenSSL's; tests/test_siv.py checks the output byte for byte against ``AESSIV`` (the RFC's
vectors, a million identifiers, every plaintext length from 0 to 130 bytes, every key size). Decryption
stays with ``AESSIV``: it is rare (erasure, re-identification) and needs no batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 16
_RB = 0x87  # the doubling's reduction constant in GF(2^128) (RFC 4493)
_U64 = np.uint64


def _dbl(block: np.ndarray) -> np.ndarray:
    """Doubling in GF(2^128) of each 16-byte row, big-endian: shift left one bit, xor 0x87 into the
    last byte when the top bit was set."""
    carry = block[:, 0] >> 7
    out = (block << 1).astype(np.uint8)
    out[:, :-1] |= block[:, 1:] >> 7
    out[:, -1] ^= (carry * _RB).astype(np.uint8)
    return out


def _ecb(cipher: Cipher[modes.ECB], blocks: np.ndarray) -> np.ndarray:
    """AES-ECB of every block, in one OpenSSL call; ``blocks`` is (..., 16) uint8 or (..., 2) uint64."""
    src = np.ascontiguousarray(blocks)
    out = bytearray(src.nbytes + BLOCK)
    enc = cipher.encryptor()
    size = enc.update_into(src.data.cast("B"), out)
    enc.finalize()
    return np.frombuffer(out, dtype=src.dtype, count=size // src.itemsize).reshape(src.shape)


class BatchSIV:
    """AES-SIV encryption under one key (32, 48 or 64 bytes) and fixed associated data (the list of
    components ``AESSIV.encrypt`` takes)."""

    def __init__(self, key: bytes, associated_data: Sequence[bytes]) -> None:
        if len(key) not in (32, 48, 64):
            raise ValueError("AES-SIV keys are 256, 384 or 512 bits")
        half = len(key) // 2
        # ECB here is the raw AES permutation, block by block: CMAC and CTR are built on it below, as
        # RFC 5297 builds them (never used to encrypt data by itself).
        self._mac = Cipher(algorithms.AES(key[:half]), modes.ECB())  # noqa: S305
        self._ctr = Cipher(algorithms.AES(key[half:]), modes.ECB())  # noqa: S305
        self._k1 = _dbl(_ecb(self._mac, np.zeros((1, BLOCK), dtype=np.uint8)))  # complete last block
        self._k2 = _dbl(self._k1)  # padded last block
        # S2V up to the plaintext is the same for every plaintext of the batch.
        d = self._cmac_one(bytes(BLOCK))
        for component in associated_data:
            d = _dbl(d) ^ self._cmac_one(component)
        self._d = d[0]
        self._dd = _dbl(d)[0]  # for plaintexts shorter than a block
        mask = np.full(BLOCK, 0xFF, dtype=np.uint8)
        mask[8] = mask[12] = 0x7F  # Q = V with the 31st and 63rd bits from the right cleared
        self._qmask = mask.view(_U64)

    def __repr__(self) -> str:
        return "BatchSIV(<key hidden>)"

    def _cmac(self, msg: np.ndarray, complete: bool) -> np.ndarray:
        """CMAC of N messages, ``msg`` (N, 16 * n) uint8, already padded (10*) when not ``complete``;
        modified in place (the last block gets its subkey). Returns (N, 2) uint64."""
        count = msg.shape[0]
        words = msg.view(_U64).reshape(count, -1, 2)
        words[:, -1] ^= (self._k1 if complete else self._k2).view(_U64)[0]
        x = np.zeros((count, 2), dtype=_U64)
        for i in range(words.shape[1]):
            x = _ecb(self._mac, x ^ words[:, i])
        return x

    def _cmac_one(self, data: bytes) -> np.ndarray:
        complete = len(data) > 0 and len(data) % BLOCK == 0
        padded = data if complete else data + b"\x80" + bytes(BLOCK - 1 - len(data) % BLOCK)
        msg = np.frombuffer(padded, dtype=np.uint8).reshape(1, -1).copy()
        return self._cmac(msg, complete).view(np.uint8)

    def encrypt_fixed(self, plain: np.ndarray) -> np.ndarray:
        """SIV || ciphertext of N plaintexts of one length L, ``plain`` (N, L) uint8 -> (N, 16 + L)."""
        count, length = plain.shape
        blocks = -(-length // BLOCK)
        msg = np.zeros((count, max(blocks, 1) * BLOCK), dtype=np.uint8)
        msg[:, :length] = plain
        if length >= BLOCK:
            msg[:, length - BLOCK : length] ^= self._d  # xorend
        else:
            msg[:, length] = 0x80
            msg ^= self._dd  # dbl(D) xor pad(P)
        complete = length >= BLOCK and length % BLOCK == 0
        if length >= BLOCK and not complete:
            msg[:, length] = 0x80
        v = self._cmac(msg, complete or length < BLOCK)
        out = np.empty((count, BLOCK + length), dtype=np.uint8)
        out[:, :BLOCK] = v.view(np.uint8).reshape(count, BLOCK)
        if length == 0:
            return out
        # CTR: counter i is Q plus i in its last 32-bit word (big-endian); the cleared bits mean the
        # addition never carries.
        counters = np.repeat((v & self._qmask)[:, None, :], blocks, axis=1)
        if blocks > 1:
            high = counters[:, :, 1]
            word = (high >> _U64(32)).astype(np.uint32).byteswap() + np.arange(blocks, dtype=np.uint32)
            counters[:, :, 1] = (high & _U64(0xFFFFFFFF)) | (word.byteswap().astype(_U64) << _U64(32))
        stream = _ecb(self._ctr, counters).view(np.uint8).reshape(count, blocks * BLOCK)
        np.bitwise_xor(plain, stream[:, :length], out=out[:, BLOCK:])
        return out

    def encrypt_many(self, plaintexts: Sequence[bytes]) -> list[bytes]:
        """``AESSIV(key).encrypt(p, associated_data)`` for every ``p``."""
        out: list[bytes] = [b""] * len(plaintexts)
        lengths = np.fromiter(map(len, plaintexts), dtype=np.int64, count=len(plaintexts))
        for length in np.unique(lengths):
            idx = np.flatnonzero(lengths == length)
            blob = b"".join([plaintexts[int(i)] for i in idx])
            sealed = self.encrypt_fixed(np.frombuffer(blob, dtype=np.uint8).reshape(len(idx), int(length)))
            for row, i in zip(sealed, idx, strict=True):
                out[int(i)] = row.tobytes()
        return out
