"""A registered compiled library, linked by llvmlite and called as lleaves calls it.

Split from :mod:`batchml.models.compiled`, which decides, builds, registers and verifies libraries;
this only runs one. Pure ctypes + llvmlite: no lleaves, no pandas, no model text.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from ctypes import CFUNCTYPE, POINTER, c_double, c_int32

import numpy as np


class Library:
    """A cached library, loaded with llvmlite and called as lleaves calls it: a drop-in for the
    ``lleaves.Model`` that ``Model(model.txt).compile(cache=library)`` returns.

    lleaves' way imports lleaves, which imports pandas (0.3-0.5 s of the night: batchml.data.arrays),
    reads model.txt (the leaves kind: rewrites all of it first) and reads the library again after
    batchml checked its sha256. This links the very bytes that were checked and needs no model text.
    lleaves' entry point ``forest_root(rows, out, start, stop)`` releases the GIL while it runs.
    """

    ENTRY = CFUNCTYPE(None, POINTER(c_double), POINTER(c_double), c_int32, c_int32)  # use_fp64: doubles in and out

    def __init__(self, code: bytes, features: int, outputs: int, options: dict) -> None:
        import llvmlite.binding as llvm

        llvm.initialize()  # as lleaves.llvm_binding does: idempotent, per process
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        try:
            cpu_features = llvm.get_host_cpu_features().flatten()
        except RuntimeError:  # LLVM cannot detect them here: lleaves compiled without, too
            cpu_features = ""
        machine = llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
            cpu=llvm.get_host_cpu_name(), features=cpu_features, reloc="pic", codemodel=options["fcodemodel"])
        module = llvm.parse_assembly("")  # the code comes from the object cache, as lleaves loads it
        self._engine = llvm.create_mcjit_compiler(module, machine)  # keeps the code mapped
        module.data_layout = str(self._engine.target_data)
        self._engine.set_object_cache(getbuffer_func=lambda _: code)
        self._engine.finalize_object()
        self._engine.run_static_constructors()
        self._entry = self.ENTRY(self._engine.get_function_address("forest_root"))
        self.features, self.outputs = features, outputs

    def predict(self, data: np.ndarray, n_jobs: int | None = None) -> np.ndarray:
        rows = np.ascontiguousarray(data, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.features:
            raise ValueError(f"the library takes rows of {self.features} features, not an array of shape {rows.shape}")
        if len(rows) >= 2**31 - 1:  # the entry point counts rows in int32
            raise ValueError(f"{len(rows)} rows in one call: split them into batches below 2**31")
        out = np.zeros(len(rows) if self.outputs == 1 else (len(rows), self.outputs))
        source, target = rows.ctypes.data_as(POINTER(c_double)), out.ctypes.data_as(POINTER(c_double))
        jobs = max(1, min(n_jobs or os.cpu_count() or 1, len(rows)))
        if jobs == 1:
            self._entry(source, target, 0, len(rows))
            return out
        step = -(-len(rows) // jobs)
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="batchml-compiled") as pool:
            list(pool.map(lambda start: self._entry(source, target, start, min(start + step, len(rows))), range(0, len(rows), step)))
        return out
