"""NIXL's own Python API driven the way LMCache's dynamic NIXL backend drives it.

One file per chunk, opened and registered per chunk, one prepped transfer per batch, the state
polled every millisecond, everything released and closed afterwards. The host buffer is one
page-aligned mapping registered once in page-sized pieces.

Every pass stores new keys, as a store of new keys does: its files get names no earlier pass
used (`pass{P}_chunk_{I}.bin`, P counting on from FIRST_PASS, which kv-bench sets to a number
no earlier run of this script in the same bench used), are created by the write (O_EXCL), read
back, and removed before the next pass, so no pass overwrites or reuses another's files. Every chunk carries its own index in its
first bytes and is verified after its read; stamping, zeroing and verifying are left out of the
timed figures.

Run by kv-bench (`cargo xtask bench`) with PYTHONPATH pointing at the NIXL runtime that
`cargo xtask setup` unpacks. Prints one JSON object: put and get GB/s (median of the passes)
and every pass's figures.

usage: nixl_lmcache_style.py DIR CHUNK_BYTES CHUNKS BATCH PASSES DIRECT_IO(0|1) [FIRST_PASS]
"""

import json
import mmap
import os
import sys
import time

import numpy as np
from nixl_cu12._api import nixl_agent, nixl_agent_config


def main() -> None:
    folder = sys.argv[1]
    page = int(sys.argv[2])
    chunks = int(sys.argv[3])
    batch = int(sys.argv[4])
    passes = int(sys.argv[5])
    direct = sys.argv[6] == "1"
    first_pass = int(sys.argv[7]) if len(sys.argv) > 7 else 0

    agent = nixl_agent("lmcache-style-" + str(os.getpid()), nixl_agent_config(backends=[]))
    agent.create_backend("POSIX", {})

    buffer = mmap.mmap(-1, page * batch)
    array = np.frombuffer(buffer, dtype=np.uint8)
    base = array.ctypes.data
    pieces = [(base + i * page, page, 0, "") for i in range(batch)]
    mem_reg = agent.register_memory(agent.get_reg_descs(pieces, "DRAM"))
    mem_descs = agent.get_xfer_descs([(a, n, d) for a, n, d, _ in pieces], "DRAM")
    mem_handle = agent.prep_xfer_dlist("", mem_descs)
    array[:] = np.arange(page * batch, dtype=np.uint64).astype(np.uint8)

    flags_write = os.O_CREAT | os.O_EXCL | os.O_RDWR | (os.O_DIRECT if direct else 0)
    flags_read = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    pattern = array.copy()

    def stamp(first: int, count: int) -> None:
        for j in range(count):
            array[j * page : j * page + 8] = np.frombuffer((first + j).to_bytes(8, "little"), dtype=np.uint8)

    def name(pass_index: int, i: int) -> str:
        return os.path.join(folder, f"pass{pass_index}_chunk_{i}.bin")

    def run(operation: str, pass_index: int) -> float:
        untimed = 0.0
        started = time.perf_counter()
        for start in range(0, chunks, batch):
            count = min(batch, chunks - start)
            paused = time.perf_counter()
            if operation == "WRITE":
                array[:] = pattern
                stamp(start, count)
            else:
                array[:] = 0
            untimed += time.perf_counter() - paused
            names = [name(pass_index, i) for i in range(start, start + count)]
            fds = [os.open(n, flags_write if operation == "WRITE" else flags_read, 0o644) for n in names]
            file_reg = agent.register_memory(agent.get_reg_descs([(0, page, fd, "") for fd in fds], "FILE"))
            file_descs = agent.get_xfer_descs([(0, page, fd) for fd in fds], "FILE")
            file_handle = agent.prep_xfer_dlist(agent.name, file_descs)
            indices = list(range(len(fds)))
            handle = agent.make_prepped_xfer(operation, mem_handle, indices, file_handle, indices)
            state = agent.transfer(handle)
            while state not in ("DONE", "ERR"):
                time.sleep(0.001)
                state = agent.check_xfer_state(handle)
            if state == "ERR":
                raise RuntimeError("NIXL transfer failed")
            agent.release_xfer_handle(handle)
            agent.release_dlist_handle(file_handle)
            agent.deregister_memory(file_reg)
            for fd in fds:
                os.close(fd)
            if operation == "READ":
                paused = time.perf_counter()
                got = array[: count * page].copy()
                array[:] = pattern
                stamp(start, count)
                if not np.array_equal(got, array[: count * page]):
                    raise RuntimeError(f"pass {pass_index}: chunks {start}..{start + count} read back wrong")
                untimed += time.perf_counter() - paused
        return chunks * page / (time.perf_counter() - started - untimed) / 1e9

    puts, gets = [], []
    for pass_index in range(first_pass, first_pass + passes):
        puts.append(run("WRITE", pass_index))
        gets.append(run("READ", pass_index))
        for i in range(chunks):
            os.remove(name(pass_index, i))
    agent.release_dlist_handle(mem_handle)
    agent.deregister_memory(mem_reg)
    print(json.dumps({"put_gbps": median(puts), "get_gbps": median(gets), "put_passes": puts, "get_passes": gets}))


def median(values: list) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


if __name__ == "__main__":
    main()
