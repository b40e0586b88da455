"""A cheap reward for throughput benchmarks on random-token models: varies within each group."""


def token_parity(prompt: str, response: str, label, **_) -> float:
    """Fraction of response words whose token index is even (words look like `t123`)."""
    words = response.split()
    if not words:
        return 0.0
    even = sum(1 for w in words if w[1:].isdigit() and int(w[1:]) % 2 == 0)
    return even / len(words)
