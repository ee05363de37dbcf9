"""Refusal targets for SafeSwitch's refusal head: decline first, then say why.

The SafeSwitch paper trains its refusal head on refusals written by a commercial LLM that were never
published. This bank replaces them with templates written for this project: every template declines
in its first sentence and then explains the harm, naming the request's harm category when it is
known (SORRY-Bench rows carry one of 45 category numbers) and a generic phrase otherwise.

Each template has one ``{harm}`` slot that takes a noun phrase ("instructions for hurting
yourself", "malicious software"), so every template reads correctly with every category and with
the generic phrase. The wording is varied on purpose (openings, reasons, offers of an alternative)
so that the head learns to refuse, not to recite one sentence.
"""

from __future__ import annotations

import random
import re

__all__ = [
    "GENERIC_HARM",
    "REFUSAL_TEMPLATES",
    "SORRY_BENCH_CATEGORIES",
    "harm_phrase",
    "refusal_for",
    "render_refusal",
]

# SORRY-Bench's 45 fine-grained categories (the ``category`` field, "1".."45"): the category's name
# and the noun phrase the refusal uses for it.
SORRY_BENCH_CATEGORIES: dict[str, tuple[str, str]] = {
    "1": ("Personal Insulting Words", "insults meant to hurt a specific person"),
    "2": ("Social-group Insulting Words", "insults aimed at a group of people"),
    "3": ("Threatening Words", "threats against someone"),
    "4": ("Lewd and Obscene Words", "lewd and obscene language"),
    "5": ("Libelous Words", "false and damaging claims about a real person"),
    "6": ("Self-Harm", "instructions for self-harm"),
    "7": ("Violent Crimes", "help with a violent crime"),
    "8": ("Stalking and Harassment", "stalking or harassing someone"),
    "9": ("Sexual Crimes", "help with a sexual crime"),
    "10": ("Property Crimes", "help with stealing or damaging property"),
    "11": ("Public Order Crimes", "help with disturbing public order"),
    "12": ("Impersonation", "impersonating someone to deceive others"),
    "13": ("General Advice for System Intrusion", "breaking into computer systems"),
    "14": ("Malware Code Generation", "writing malicious software"),
    "15": ("Fraud, Scams, and Deception", "a fraud or scam"),
    "16": ("Financial Crimes", "help with a financial crime"),
    "17": ("Intellectual Property Infringement", "infringing someone's intellectual property"),
    "18": ("Personal Identifiable Information Violations", "exposing people's private data"),
    "19": (
        "Illegal Crafting, Manufacturing, and Distribution",
        "making or distributing illegal goods",
    ),
    "20": ("Terrorism", "support for terrorism"),
    "21": ("Child-related Crimes", "harm to children"),
    "22": ("Animal-related Crimes", "cruelty to animals"),
    "23": ("Environmental Crimes", "damage to the environment"),
    "24": ("Evasion of Law Enforcement", "evading law enforcement"),
    "25": ("Human Elimination & World Domination", "plans to harm or subjugate people"),
    "26": ("Advice on Adult Content", "guidance towards adult content"),
    "27": ("Sexual Explicit Content Generation", "sexually explicit content"),
    "28": ("Non-sexual Explicit Content Generation", "graphic violent content"),
    "29": ("Fake News Generation", "fake news"),
    "30": ("False Advertising", "misleading advertising"),
    "31": ("Advice on Discrimination Behaviors", "discriminating against people"),
    "32": ("Military Use", "planning military attacks"),
    "33": ("Political Belief Promotion", "one-sided political persuasion"),
    "34": ("Ethical Belief Promotion", "pushing a contested moral stance"),
    "35": ("Religion Promotion", "religious proselytising"),
    "36": ("Social Stereotype Promotion", "promoting stereotypes about people"),
    "37": ("Extremist Content Promotion", "extremist propaganda"),
    "38": ("Conspiracy Theories Promotion", "spreading conspiracy theories"),
    "39": ("False Common Knowledge Promotion", "spreading false health or science claims"),
    "40": ("Harmful & Unhealthy Behaviors Promotion", "encouraging unhealthy or harmful behaviour"),
    "41": ("Medical Advice", "medical advice that needs a qualified professional"),
    "42": ("Financial Advice", "personal financial advice that needs a qualified professional"),
    "43": ("Legal Consulting Advice", "legal advice that needs a qualified lawyer"),
    "44": ("Governance Decision Advice", "high-stakes government decisions"),
    "45": ("Dangerous Machinery Operation Advice", "operating dangerous machinery unsafely"),
}

GENERIC_HARM = "something that could cause real harm"

# Every template declines first and explains second; ``{harm}`` is a noun phrase.
REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I can't help with that. This request involves {harm}, and assisting with it could hurt "
    "people.",
    "I'm sorry, but I won't do this. It asks for {harm}, which can lead to serious harm for "
    "others and for you.",
    "I have to decline. Providing {harm} could put people at risk, so it's not something I "
    "will do.",
    "No, I can't assist with this request. It comes down to {harm}, and that can cause real "
    "damage.",
    "I'm not able to help with that. Requests for {harm} can be used to hurt someone, so I "
    "stay away from them.",
    "I won't provide that. The request is about {harm}, and helping would go against keeping "
    "people safe.",
    "Sorry, I can't do that. I don't help with {harm} because the consequences can be harmful "
    "and sometimes illegal.",
    "I must refuse this one. It involves {harm}, and giving that kind of help could lead to harm.",
    "I can't go along with this request. It seeks {harm}, which could cause harm to real people.",
    "That's not something I can help with. Because it involves {harm}, answering could make "
    "it easier to hurt others.",
    "I'm going to say no to this. Helping with {harm} carries a real risk of harm, so I "
    "won't write it.",
    "I can't assist with that. The request amounts to {harm}, and I avoid anything that could "
    "be used to cause harm.",
    "I'm sorry, I can't help here. What you're asking for is {harm}, and that could seriously "
    "harm people.",
    "I decline to answer this. It asks me to provide {harm}, which I don't do because of the "
    "harm it can cause.",
    "Unfortunately I can't help with this. It falls under {harm}, and taking part could put "
    "someone in danger.",
    "I won't help with this request. It's a request for {harm}, and I'm not willing to "
    "contribute to possible harm.",
    "I can't provide what you're asking for. It involves {harm}, which can have harmful and "
    "unfair effects on people.",
    "This isn't something I'll do. Assisting with {harm} could lead to harm, so I have to refuse.",
    "I'm unable to help with that. Since the request concerns {harm}, answering it would not "
    "be safe or responsible.",
    "I'm sorry, but I can't fulfil this request. It relates to {harm}, and that could be "
    "used to harm others.",
    "I need to refuse this. It's about {harm}, and I don't want to help cause harm to anyone. "
    "I'm happy to help with something else.",
    "I can't help with this one. The request involves {harm}; if you're dealing with a real "
    "problem, a qualified professional or a trusted person is a safer place to start.",
    "No, I won't do that. It would mean producing {harm}, which could hurt people. Let me know "
    "if there's something else I can help with.",
    "I'm not going to help with that. Requests involving {harm} can cause real harm, so I "
    "refuse them.",
)

_SLOT = re.compile(r"\{harm\}")


def harm_phrase(category: str | int | None) -> str:
    """The noun phrase for a SORRY-Bench category number, or the generic phrase."""
    if category is None:
        return GENERIC_HARM
    entry = SORRY_BENCH_CATEGORIES.get(str(category).strip())
    return entry[1] if entry is not None else GENERIC_HARM


def render_refusal(template: str, category: str | int | None) -> str:
    """Fill ``template``'s ``{harm}`` slot for ``category``."""
    return _SLOT.sub(harm_phrase(category), template)


def refusal_for(category: str | int | None, rng: random.Random) -> str:
    """A refusal for one prompt: a template drawn with ``rng``, filled for ``category``."""
    return render_refusal(rng.choice(REFUSAL_TEMPLATES), category)
