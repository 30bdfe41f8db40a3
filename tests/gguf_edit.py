"""Test helper: copy a GGUF file with metadata or tensors changed, to make bad inputs."""
from __future__ import annotations

import numpy as np
import gguf
from gguf import GGUFReader, GGUFValueType


def rewrite_gguf(src, dst, drop_keys=(), set_keys=None, drop_tensors=(), add_tensors=None, arch=None,
                 replace_tensors=None):
    """set_keys: {key: (value, GGUFValueType)}; add_tensors: {name: float32 array};
    replace_tensors: {name: (raw uint8 blocks, GGMLQuantizationType)} keeping the logical shape."""
    r = GGUFReader(str(src))
    arch = arch or bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(str(dst), arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name in drop_keys or name == "general.architecture":
            continue
        if set_keys and name in set_keys:
            continue
        main = field.types[0]
        if main == GGUFValueType.ARRAY:
            sub = field.types[-1]
            val = field.contents()
            w.add_key_value(name, val, main, sub_type=sub)
        else:
            w.add_key_value(name, field.contents(), main)
    for name, (value, vtype) in (set_keys or {}).items():
        w.add_key_value(name, value, vtype)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        data = np.array(t.data)
        if replace_tensors and t.name in replace_tensors:
            raw, qtype = replace_tensors[t.name]
            w.add_tensor(t.name, raw, raw_dtype=qtype)      # byte-shaped rows: the writer infers the shape
        elif t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(t.name, data.reshape(shape))
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    for name, arr in (add_tensors or {}).items():
        w.add_tensor(name, np.asarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
