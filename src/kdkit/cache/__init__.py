"""Teacher-logit cache: dump teacher outputs once, read them memory-mapped while training.

Format (``docs/cache-format.md``): one directory with, per teacher, one contiguous
little-endian ``[N, C]`` float16/float32 array, the ordered UTF-8 keys, a sorted BLAKE2b
key index, and ``manifest.json`` (written last) with shapes, dtypes, teacher weight
fingerprints and a checksum per file.  No pickle anywhere.

Example:
    >>> import tempfile, torch
    >>> data = [{"features": torch.randn(3), "path": f"audio/{i}.wav"} for i in range(8)]
    >>> index = dump_teacher_logits(torch.nn.Linear(3, 4), data, tempfile.mkdtemp(), progress=False)
    >>> load_cached_logits(["audio/5.wav", "audio/2.wav"], index).shape
    torch.Size([2, 4])
"""

from kdkit.cache._format import CacheError, normalize_key, position_bytes
from kdkit.cache.dataset import TeacherLogitsDataset
from kdkit.cache.dump import dump_teacher_logits, teacher_fingerprint
from kdkit.cache.index import CacheIndex, load_cache_index, verify_cache
from kdkit.cache.load import load_cached_logits

__all__ = [
    "CacheError",
    "CacheIndex",
    "TeacherLogitsDataset",
    "dump_teacher_logits",
    "load_cache_index",
    "load_cached_logits",
    "normalize_key",
    "position_bytes",
    "teacher_fingerprint",
    "verify_cache",
]
