"""CPU cost of the key check and the usage accounting of one request.

Times what Aivonx adds per relayed request with keys on: finding the key
(SHA-256 and a lookup), its allow-list and limits, the meter seeing an
answer's chunks and end, and counting the usage; no database (the batch
write runs a few times a second, not per request). A micro-benchmark:
run it alone, `python -m benchmarks.keycheck`.
"""
from __future__ import annotations

import time

from aivonx import modelnames
from aivonx.keys import KeyService, Meter
from aivonx.keys.keyring import KEY_PREFIX, Key, key_hash

ROUNDS = 20_000
CHUNK = b'{"model":"llama3","created_at":"2025-01-01T00:00:00Z","response":"tok ","done":false}\n'
FINAL = (b'{"model":"llama3","created_at":"2025-01-01T00:00:00Z","response":"","done":true,'
         b'"done_reason":"stop","total_duration":1,"load_duration":1,"prompt_eval_count":12,'
         b'"prompt_eval_duration":1,"eval_count":20,"eval_duration":1}\n')


def main() -> None:
    service = KeyService()
    service.mode = "keys"
    token = KEY_PREFIX + "x" * 43
    key = Key(id=1, name="bench", key_hash=key_hash(token), models=("llama3*",), rpm=10 ** 9,
              max_concurrent=10 ** 6, daily_tokens=10 ** 15, monthly_tokens=10 ** 15)
    service.keyring.by_hash[key.key_hash] = key
    service.keyring.by_id[key.id] = key
    model = modelnames.canonical("llama3")
    for label, chunks in (("check + accounting, 1 chunk (stream false)", 1),
                          ("check + accounting, 20 chunks (stream)", 20)):
        body = [CHUNK] * (chunks - 1) + [FINAL]
        start = time.process_time()
        for _ in range(ROUNDS):
            found = service.identify(token)
            service.admit(found, model, "llama3")
            meter = Meter("ollama")
            for data in body:
                meter.chunk(data)
            meter.end(200, 0.1, False)
            service.finish(found, "llama3:latest", meter)
        spent = (time.process_time() - start) / ROUNDS
        print(f"{label}: {spent * 1e6:.1f} µs CPU per request")
    start = time.process_time()
    for _ in range(ROUNDS):
        service.identify(token)
    print(f"key check alone: {(time.process_time() - start) / ROUNDS * 1e6:.2f} µs CPU")


if __name__ == "__main__":
    main()
