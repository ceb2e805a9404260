"""Read the records of an offline W&B run file (`run-<id>.wandb`) into wandb's own protobufs.

wandb >= 0.2x writes these files from its Go core and ships no Python reader, so this walks the
LevelDB-log framing it uses (a 7-byte ":W&B" header, then 32 KiB blocks of records with a 7-byte
header: CRC, length, type FULL/FIRST/MIDDLE/LAST) and parses each payload as `wandb.proto.Record`.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind in (FULL, FIRST):
            pending = payload
        elif kind in (MIDDLE, LAST):
            pending += payload
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def run_info(run_dir: str | Path) -> dict:
    """group, job_type, run id, tags, config, summary, history keys and the last logged value of each key,
    the exit code the run was finished with (`exit_code`), and the artifacts logged (`made`) and used (`used`:
    logged with use_after_commit, see pipeline/harness/tracking.py), each {name, type, digest, aliases, metadata},
    of one offline run directory."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    info: dict = {"history_keys": set(), "config": {}, "last": {}, "summary": {}, "made": [], "used": []}
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            info.update(group=rec.run.run_group, job_type=rec.run.job_type, run_id=rec.run.run_id,
                        tags=list(rec.run.tags))
            info["config"].update({item.key: json.loads(item.value_json) for item in rec.run.config.update})
        elif kind == "config":
            info["config"].update({item.key: json.loads(item.value_json) for item in rec.config.update})
        elif kind == "summary":
            info["summary"].update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                    for item in rec.summary.update})
        elif kind == "artifact":
            a = rec.artifact
            info["used" if a.use_after_commit else "made"].append(
                {"name": a.name, "type": a.type, "digest": a.digest, "aliases": list(a.aliases),
                 "metadata": json.loads(a.metadata) if a.metadata else {},
                 "files": {entry.path: entry.digest for entry in a.manifest.contents}})
        elif kind == "exit":
            info["exit_code"] = rec.exit.exit_code
        elif kind == "history":
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                info["history_keys"].add(key)
                info["last"][key] = json.loads(item.value_json)
    return info
