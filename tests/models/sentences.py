"""Varied test sentences: short, medium, long (past 128 tokens), punctuation, numbers, other scripts."""
SHORT = [
    "My name is", "Hello!", "Paris", "What time is it?", "Cats sleep a lot.", "I love pizza.",
    "It is raining.", "Open the door.", "42", "Good morning, world.", "The end.", "Why not?",
    "Thanks a lot!", "See you tomorrow.", "Ça va bien, merci.", "Das ist gut.", "東京は大きい。",
]
MEDIUM = [
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Machine learning models can be compiled ahead of time for dedicated accelerators.",
    "She bought three apples, two pears and a melon at the market on Saturday morning.",
    "A transformer block combines self-attention with a position-wise feed-forward network.",
    "The meeting was postponed because half of the team was stuck in traffic.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "In 1969, Apollo 11 landed on the Moon and Neil Armstrong stepped onto its surface.",
    "Please remember to water the plants while I am away on holiday next week.",
    "The stock market fell sharply after the central bank raised interest rates again.",
    "He plays the violin every evening, and his neighbours have learned to enjoy it.",
    "Quantum computers use qubits, which can represent zero and one at the same time.",
    "The recipe calls for two cups of flour, one egg, and a pinch of salt.",
    "Our flight to Lisbon was delayed by four hours because of a storm over the Atlantic.",
    "The library closes at eight o'clock on weekdays and at noon on Sundays.",
    "Large language models predict the next token given all the previous tokens.",
    "Mount Everest is the highest mountain above sea level, at 8,849 metres.",
    "The committee approved the budget after a long debate about school funding.",
    "Electric cars are becoming cheaper as battery prices continue to fall.",
    "Water boils at 100 degrees Celsius at sea level, but at lower temperatures on mountains.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
]
_PARAGRAPH = (
    "Once upon a time, in a small village surrounded by forests and rivers, there lived an old "
    "clockmaker who repaired every clock in the region. People came from distant towns with broken "
    "watches, grandfather clocks and music boxes, and he fixed them all with patience and care. "
)
LONG = [
    _PARAGRAPH * 2,
    _PARAGRAPH * 4,  # past 128 tokens
    "The history of computing is long: " + ", ".join(f"step {i} brought new ideas" for i in range(30)) + ".",
    " ".join(["data"] * 150),
    "Embeddings map sentences to vectors; similar meanings land close together, and this property is "
    "used for search, clustering, deduplication and recommendation across many languages and domains. "
    "Models such as MiniLM are distilled from larger teachers to keep quality while cutting cost.",
    "Numbers: " + " ".join(str(n * 37 % 1000) for n in range(60)),
    "A list of fruits: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, "
    "mango, nectarine, orange, papaya, quince, raspberry, strawberry, tangerine, ugli, watermelon.",
    "Questions people ask: how does it work? why is it fast? where does it run? what does it cost? "
    "who maintains it? when was it released? which hardware is supported? can I try it offline?",
    "The report concludes that, although the pilot programme met most of its targets, further work is "
    "needed on training, on maintenance schedules and on the way results are communicated to the public.",
    "Ein langer deutscher Satz über das Wetter, die Berge, die Seen und die Menschen, die dort leben "
    "und arbeiten, zeigt, dass auch andere Sprachen verarbeitet werden können.",
    "Un texto en español sobre la historia de la música, desde los cantos antiguos hasta la música "
    "electrónica moderna, pasando por la ópera, el jazz y el rock.",
    "Short words: a an the of in on at to by up as is it be we he me my no so or if do go us.",
    "Code-like text: def forward(self, x): return self.linear(x) + self.bias  # a small layer",
    "Emoji and symbols: 🙂 ✓ → ∑ ∞ ≈ € £ ¥ % & @ # — these should not break anything.",
]
SENTENCES = SHORT + MEDIUM + LONG
assert len(SENTENCES) >= 50, len(SENTENCES)
