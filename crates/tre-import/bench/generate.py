"""Input for the import throughput figure (issue #15): 1M patients and 10M
unsorted events as CSV, written to the directory given (default ./in).

    python3 crates/tre-import/bench/generate.py /tmp/imp10m/in
    tre dataset import --policy crates/tre-import/bench/policy.toml \
        --from /tmp/imp10m/in --out /tmp/imp10m/data/big --key-file /tmp/imp10m/master.key
"""
import os
import random
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "in"
os.makedirs(out, exist_ok=True)
random.seed(7)
P, N = 1_000_000, 10_000_000
with open(os.path.join(out, "patients.csv"), "w") as f:
    f.write("person_id,sex,year_of_birth\n")
    ids = list(range(P))
    random.shuffle(ids)
    f.writelines(f"{9000000000 + i},{'FM'[i % 2]},{1930 + i % 90}\n" for i in ids)
codes = [f"C{c:03d}" for c in range(500)]
with open(os.path.join(out, "events.csv"), "w") as f:
    f.write("person_id,event_date,code,value\n")
    r, ri = random.random, random.randrange
    for _ in range(N // 100_000):
        f.writelines(
            f"{9000000000 + ri(P)},2024-{1 + ri(12):02d}-{1 + ri(28):02d},{codes[ri(500)]},{r() * 100:.2f}\n"
            for _ in range(100_000)
        )
