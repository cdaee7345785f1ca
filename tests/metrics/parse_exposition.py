#!/usr/bin/env python3
"""Parses a Prometheus text exposition from stdin with prometheus_client's own parser (an
implementation independent of the broker's exporter) and prints one JSON object:
{"samples": [[name, {labels}, value], ...], "types": {family: type}}.

Exits non-zero, with the reason on stderr, when the text does not parse or when a series
(name + labels) appears twice.
"""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    text = sys.stdin.read()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError and friends on bad input
        print(f"exposition does not parse: {e!r}", file=sys.stderr)
        return 2
    seen = set()
    samples = []
    types = {}
    for family in families:
        if family.name in types:
            print(f"family {family.name} appears twice", file=sys.stderr)
            return 3
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if key in seen:
                print(f"duplicate series {sample.name}{sample.labels}", file=sys.stderr)
                return 3
            seen.add(key)
            samples.append([sample.name, sample.labels, sample.value])
    json.dump({"samples": samples, "types": types}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
