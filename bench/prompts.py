"""The fixed prompt and sampling every generation benchmark uses.

Each repetition starts with a different word: llama-cpp-python reuses the KV cache for
the longest common token prefix of consecutive prompts, so repeating one prompt would
skip the prompt processing we want to measure. The rest (~100 tokens) is identical.
"""

from __future__ import annotations

from typing import Any

_OPENERS = (
    "Alpha",
    "Bravo",
    "Charlie",
    "Delta",
    "Echo",
    "Foxtrot",
    "Golf",
    "Hotel",
    "India",
    "Juliet",
    "Kilo",
    "Lima",
    "Mike",
    "November",
    "Oscar",
    "Papa",
    "Quebec",
    "Romeo",
    "Sierra",
    "Tango",
)

_BODY = (
    " team, status report. The distributed inference cluster has several ordinary machines, each"
    " lending its memory and processor to one server. The server splits the layers of a language"
    " model between the workers, sends each its weights once, and then, for every token, passes a"
    " hidden state from one worker to the next. Explain in plain words what limits the speed of"
    " such a cluster, which parts of the network matter most, and what a careful operator should"
    " measure first before buying"
)

#: Sampling of every run: greedy, the API's other defaults spelled out (schemas.py).
SAMPLING: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}


def prompt(rep: int, tiny: bool = False) -> str:
    """The prompt of repetition ``rep`` (0 is the warm-up); ``tiny``: its first word alone.

    Tiny prompts (2-3 tokens) measure a layer's fixed cost per request with little compute
    (and so little compute noise) around it.
    """
    return _OPENERS[rep % len(_OPENERS)] + ("." if tiny else _BODY)


#: The multi-turn chat (bench.engine): a system prompt and eight user turns of real text.
#: Each turn resends the whole history with the assistant's replies; with ~64-token replies
#: the eighth request carries ~1,600 prompt tokens (SmolLM2's tokenizer).
CHAT_SYSTEM = (
    "You are a patient technical assistant for a small community workshop that repairs old computers and "
    "teaches people to run software on them. The people who write to you are volunteers, not engineers: "
    "answer in plain words, keep each answer short and concrete, say which step comes first, and when "
    "something could damage a machine or lose data, say so clearly before anything else. If a question "
    "depends on a detail you were not given, name the detail and give the most likely answer anyway. "
    "Prefer tools that are free, that run without an internet connection, and that an old laptop can run."
)

CHAT_TURNS = (
    "Hello. Our workshop was given six old office desktops last week. Each one has a four-core processor "
    "from about eight years ago, sixteen gigabytes of memory and a small solid-state disk, and they all "
    "still boot. None of them has a graphics card worth mentioning. One of our volunteers read that you "
    "can run a language model across several ordinary machines by splitting its layers between them, and "
    "she would like to build a small assistant that answers questions about our repair manuals, which are "
    "mostly scanned paper. Before we spend a weekend on it: is this a reasonable idea at all, and what "
    "would you check first on the machines themselves before installing anything?",
    "Thank you. We checked the machines the way you said. Five of them are identical and one has a slightly "
    "older processor that lacks some of the newer vector instructions. The memory tests passed on all of "
    "them after we reseated two modules. They are connected through an old gigabit switch from the same "
    "office, with cables of unknown age. Someone suggested we should first measure the network between the "
    "machines before anything else, because the model would send data between them for every word it "
    "writes. How would you measure that in a simple way, which numbers should we write down, and what "
    "would count as a good or a bad result for this kind of use?",
    "We measured it. Between any two machines we get a little over nine hundred megabits per second for a "
    "large transfer, and a round trip for a tiny message takes between two and four tenths of a millisecond, "
    "except for the machine on the far end of the room, where it sometimes jumps to several milliseconds. "
    "We replaced its cable and the jumps became rarer but did not go away completely. The volunteer who "
    "knows the most about networks thinks the switch port itself may be failing. Should we keep that "
    "machine in the cluster, move it to another port, or leave it out entirely for now?",
    "We moved it to another port and the jumps stopped. Now the model. Our manuals are in English and a "
    "little French, and most questions are short, like which screw holds the fan of a certain model or "
    "how to reset the password of a particular printer. We were thinking of a model with about one "
    "billion parameters to start with, and a larger one later if the small one is too limited. How much "
    "memory does such a model need for its weights and for a reasonable amount of context, how should we "
    "choose the quantization, and would one billion parameters even need more than one of our machines?",
    "That is helpful. We tried the small model on one machine and it writes about fifteen words per "
    "second, which is enough for us. The problem is that several volunteers use it at the same time on "
    "Saturday mornings, and then each of them waits for the others: the answers come one after another, "
    "not side by side. Someone said that a server can process several conversations in one batch, so that "
    "four people together get almost four times the total speed. Is that true on an ordinary processor "
    "without a graphics card, and what should we expect to lose for each person when we do that?",
    "Another question came up while testing. When a volunteer asks a follow-up question in the same "
    "conversation, the assistant takes longer and longer to start answering, because the whole previous "
    "conversation is sent again each time and the model reads it all again from the beginning. After "
    "seven or eight questions it takes several seconds before the first word appears. We read that a "
    "server can keep the work it already did for the earlier part of a conversation. How does that work "
    "in plain words, and is there any risk that the answers change because of it?",
    "We also want to be careful about the scanned manuals. Some of them contain the home addresses and "
    "telephone numbers of former owners, written on the first page by hand, and a few have notes about "
    "passwords that were taped inside the cases. We do not want the assistant to repeat any of that, and "
    "we certainly do not want the text to leave the building. What should we remove before we give the "
    "manuals to the assistant, how would you find those pages among more than two thousand scans, and "
    "is there anything about running the model itself that could send our data somewhere else?",
    "Last question for today, and thank you for your patience. If we write down everything we did into a "
    "short guide for the next workshop that receives old machines, what should the guide contain, in which "
    "order, and what are the three mistakes you would warn them about first? Please keep it short enough "
    "to fit on two printed pages, because our volunteers will read it on paper next to the machines, and "
    "name the measurements they should repeat every few months to notice when something slowly breaks.",
)
