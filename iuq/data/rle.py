"""COCO run-length encodings checked before pycocotools decodes them."""

from __future__ import annotations


def rle_counts_problem(counts, pixels: int) -> str | None:
    """None if `counts` is a well-formed RLE of `pixels` pixels, else what is wrong."""
    try:
        runs = rle_runs(counts, pixels)
    except ValueError as err:
        return str(err)
    if sum(runs) != pixels:
        return f"runs cover {sum(runs)} pixels, the mask has {pixels} (truncated?)"
    return None


def rle_runs(counts, pixels: int) -> list[int]:
    """The run lengths of an RLE's `counts` (compressed string or list); ValueError if malformed.

    pycocotools decodes compressed counts without any check: a character outside its alphabet
    or a run length past the image makes it write out of bounds or loop for minutes. Neither
    pycocotools nor faster-coco-eval validates an RLE, so the format is read here (pycocotools'
    `rleFrString`: characters '0'..'o', 5 bits each, bit 0x20 = "more follows", bit 0x10 of the
    last one = sign, counts after the second stored as differences to the one two places back).
    """
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("uncompressed counts must be non-negative integers")
        return counts
    if not isinstance(counts, str):
        raise ValueError(f"counts must be a string (compressed) or a list (uncompressed), got {type(counts).__name__}")
    runs, total, i = [], 0, 0
    while i < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if i == len(counts):
                raise ValueError("compressed counts end in the middle of a number (truncated?)")
            c = ord(counts[i]) - 48
            if not 0 <= c <= 63:
                raise ValueError(f"character {counts[i]!r} at {i} is not in compressed RLE's alphabet '0'..'o'")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            shift += 5
            i += 1
            if not more and c & 0x10:
                value -= 1 << shift  # sign-extend
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f"run {len(runs)} has negative length {value}")
        runs.append(value)
        total += value
        if total > pixels:
            raise ValueError(f"runs cover more than the {pixels} pixels of the mask")
    return runs
