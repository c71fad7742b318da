"""Generate kubetune's bundled example datasets (stdlib only, fully deterministic).

* ``support-intents/``: IT-support ticket intent classification (7 labels), for
  fine-tuning a small sentence encoder with a classification head.
* ``support-chat/``: short troubleshooting dialogues for chat SFT of a small model.

Every ticket and dialogue is assembled from many independent fragments with a seeded
RNG, deduplicated (case- and punctuation-insensitive) and split so that no text
appears in two splits.  ``python examples/data/generate.py`` rewrites the files;
``--check`` exits 1 if any committed file differs from what would be generated.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent
INTENTS_DIR = DATA_DIR / "support-intents"
CHAT_DIR = DATA_DIR / "support-chat"
SPLITS = ("train", "validation", "test")

INTENT_SEED = 20240611
CHAT_SEED = 20240612

# Rows per label and split: 930 rows, 720 / 90 / 120.
INTENT_COUNTS: dict[str, tuple[int, int, int]] = {
    "network": (104, 13, 17),
    "printer": (104, 13, 17),
    "account": (104, 13, 17),
    "hardware": (104, 13, 17),
    "software": (104, 13, 17),
    "billing": (104, 13, 17),
    "escalate": (96, 12, 18),
}
CHAT_COUNTS = (240, 30, 40)
TWO_TURN_SHARE = 0.2
MAX_DIALOGUE_TOKENS = 150  # estimated, see estimate_tokens

FORBIDDEN_TEXTS = ("my laptop will not connect to the office wifi",)

# ---------------------------------------------------------------------------
# Template expansion: ``[a|b|c]`` picks one alternative (nestable, innermost
# first), ``{slot}`` is filled from SLOTS.  ``[|x]`` makes ``x`` optional.
# ---------------------------------------------------------------------------

# fmt: off
SLOTS: dict[str, Sequence[str]] = {
    "device": (
        "laptop", "work laptop", "laptop", "MacBook", "ThinkPad", "Dell laptop",
        "desktop", "PC", "Surface", "computer", "HP EliteBook", "Mac",
    ),
    "app": (
        "Outlook", "Teams", "Excel", "Word", "Zoom", "Slack", "Chrome", "Adobe Acrobat",
        "SAP", "Salesforce", "VS Code", "PowerPoint", "OneDrive", "QuickBooks", "Firefox",
        "the CRM", "Tableau", "AutoCAD",
    ),
    "printer": (
        "the printer on the 3rd floor", "the HP LaserJet in finance",
        "the big Xerox by reception", "the Canon copier", "the label printer in the warehouse",
        "the printer next to my desk", "the colour printer in marketing", "PRN-04",
        "the Brother printer in the meeting room", "the plotter",
    ),
    "wifi": (
        "office wifi", "office Wi-Fi", "corporate wifi", "guest wifi", "KT-Staff network",
        "wireless", "wifi in the meeting rooms", "5GHz network",
    ),
    "site": (
        "the intranet", "SharePoint", "Jira", "the HR portal", "the wiki", "Confluence",
        "the timesheet site", "our Git server", "the expenses portal", "the ticketing system",
    ),
    "office": (
        "London", "Austin", "Berlin", "Denver", "Toronto", "Singapore", "Dublin", "Leeds",
        "Manchester", "Lyon",
    ),
    "when": (
        "this morning", "since yesterday", "since Monday", "after lunch", "for about an hour",
        "all week", "since the weekend", "since last night", "on and off today",
        "since I got back from leave", "for two days now",
    ),
    "err": (
        "0x80070005", "0x800f081f", "error 1603", "0xc000007b", "error 53",
        "0x80004005", "error code 2", "0x8024402c", "0x80070643",
    ),
    "exec": (
        "our CEO", "the CFO", "our VP of Sales", "the managing director", "the COO",
        "the head of legal", "our chairman",
    ),
    "amount": (
        "$49.99", "€120", "£300", "$1,240.00", "$89", "€2,400", "£18.50", "$630",
        "$12,000", "€75",
    ),
    "part": (
        "monitor", "keyboard", "mouse", "docking station", "webcam", "headset",
        "second screen", "external monitor", "trackpad",
    ),
    "product": (
        "Pro plan", "Team plan", "Enterprise subscription", "Office 365 licence",
        "Adobe licence", "Zoom licence", "support contract", "annual plan",
    ),
    "people": (
        "the whole team", "everyone on the floor",
        "all 40 people here", "every user", "the entire sales team",
    ),
    "wdevice": ("PC", "laptop", "ThinkPad", "Dell laptop", "Surface", "desktop"),
    "syncapp": ("OneDrive", "Dropbox", "Google Drive", "the sync client", "SharePoint sync"),
    "hours": ("two hours", "an hour", "45 minutes", "most of the morning", "three hours"),
    "since": (
        "since yesterday", "since Monday", "for about an hour", "all week", "since the weekend",
        "for two days now", "since last night", "since the update",
    ),
}

# fmt: on

_ALT_RE = re.compile(r"\[([^\[\]]*)\]")
_SLOT_RE = re.compile(r"\{(\w+)\}")


def expand(template: str, rng: random.Random) -> str:
    """Resolve alternatives and slots in ``template`` using ``rng``."""
    text = template
    while True:
        match = _ALT_RE.search(text)
        if match is None:
            break
        choice = rng.choice(match.group(1).split("|"))
        text = text[: match.start()] + choice + text[match.end() :]

    def fill(m: re.Match[str]) -> str:
        key = m.group(1)
        if key == "n":
            return str(rng.randint(2, 9))
        if key == "inv":
            return f"INV-{rng.randint(10000, 99999)}"
        if key == "acct":
            return f"AC-{rng.randint(1000, 9999)}"
        if key == "ticket":
            return f"#{rng.randint(1000, 9999)}"
        return rng.choice(SLOTS[key])

    text = _SLOT_RE.sub(fill, text)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r" ([.,?!])(?=\s|$)", r"\1", text)


class _SlotBinder:
    """Resolves ``{slot}`` once per dialogue so every turn uses the same value."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.values: dict[str, str] = {}

    def __call__(self, template: str) -> str:
        def bind(m: re.Match[str]) -> str:
            key = m.group(1)
            if key not in self.values:
                self.values[key] = expand("{" + key + "}", self.rng)
            return self.values[key]

        return expand(_SLOT_RE.sub(bind, template), self.rng)


# ---------------------------------------------------------------------------
# Intent tickets
# ---------------------------------------------------------------------------

# fmt: off
CORES: dict[str, tuple[str, ...]] = {
    "network": (
        "My {device} [won't|can't|doesn't] connect to the {wifi} [anymore|{when}|].",
        "[The|My] {wifi} keeps dropping [every few minutes|whenever I move rooms|{when}].",
        "VPN [won't connect|keeps disconnecting|times out|is stuck on 'connecting'] "
        "[when I work from home|{when}|from the hotel|].",
        "[Internet|The internet|Our connection] is [super|really|painfully] slow {when}, "
        "pages take forever to load.",
        "I can't reach {site} but other websites load fine.",
        "{site} [says|gives] 'DNS_PROBE_FINISHED_NXDOMAIN' [in every browser|{when}|].",
        "The ethernet port at my desk [isn't working|is dead|gives no link light].",
        "Connected to the {wifi} but [there's|it says] no internet [access|].",
        "[I get|Getting] ERR_CONNECTION_TIMED_OUT [for|on] {site} [over the VPN|from home|].",
        "My {device} sees the {wifi} but fails to join, it just says 'can't connect to "
        "this network'.",
        "The {wifi} password doesn't seem to work on my phone [anymore|since it changed|].",
        "Video calls keep freezing because the network [lags|drops packets|is so unstable].",
        "Can't map the shared drive, it says the network path was not found.",
        "[The|My] VPN client connects but I can't [open|reach] {site}.",
        "My {device} [only gets|is stuck on] a 169.254 address and has no network.",
        "The wifi signal in [the {office} office|meeting room {n}|the back office] is "
        "[really weak|almost zero|terrible].",
        "[Remote desktop|RDP] to my office PC [keeps dropping|won't connect] [over VPN|].",
        "I'm on the {wifi} but downloads are crawling at like 1 Mbps.",
        "The proxy [keeps asking for my login|is blocking] [{site}|every site|GitHub].",
        "[Wi-Fi|Wifi|WiFi] [icon|symbol] has a red cross on my {device} and no networks show "
        "up.",
        "My {device} connects to the {wifi} then disconnects after a few seconds.",
        "[Need|Can I get] [the wifi details|access to the {wifi}] for a visitor in "
        "[the {office} office|meeting room {n}].",
        "Packet loss on the network [is awful|{when}], pings to the gateway time out.",
        "After docking, my {device} [prefers wifi over the cable|won't use the wired "
        "connection].",
    ),
    "printer": (
        "{printer} [keeps jamming|jams on every job|has a paper jam I can't clear].",
        "{printer} shows as offline [on my {device}|{when}|even though it's switched on].",
        "My print jobs are stuck in the [queue|print queue] and nothing comes out.",
        "{printer} [is out of toner|says toner low|needs a new toner cartridge].",
        "Prints from {printer} come out [faded|streaky|with black lines down the page].",
        "Scan to email on {printer} [stopped working|never arrives|gives an SMTP error].",
        "[Can you add|I need] {printer} [to|on] my {device}, I can't find it in the list.",
        "{printer} only prints [blank pages|half the page|garbled symbols].",
        "Double-sided printing doesn't work on {printer}.",
        "{printer} prints from the wrong tray, all my labels [came out|printed] on plain "
        "paper.",
        "I sent a [PDF|document|spreadsheet] to {printer} {when} and it never printed.",
        "The print driver [for {printer}|] [won't install|keeps failing] on my {device}.",
        "{printer} [is making a grinding noise|has an error light blinking|says 'call for "
        "service'].",
        "Colour printing [is disabled|comes out black and white] on {printer}.",
        "Someone's [huge|200-page] print job is blocking {printer}, can it be cancelled?",
        "The scanner on {printer} [makes crooked scans|saves scans as blank pages].",
        "{printer} asks for a PIN [at release|when I swipe my badge] and mine doesn't work.",
        "[Printing|Print] from {app} [hangs|fails] but other apps can print to {printer}.",
        "{printer} is printing [really slowly|one page a minute] {when}.",
    ),
    "account": (
        "[I forgot|I've forgotten|Forgot] my password [and|so] I can't log in [to "
        "{site}|to my {device}|].",
        "My account [is|got] locked [out|] after too many attempts.",
        "I got a new phone and my MFA [codes no longer work|app is gone|prompts go to the "
        "old one].",
        "[I need|Please give me|Can I get] access to [the Finance shared drive|the "
        "{office} SharePoint site|{site}|the Marketing Teams channel].",
        "[My password expired|Password expired] and the reset page [won't accept a new "
        "one|keeps erroring].",
        "New starter [joining|starting] [Monday|next week|tomorrow] needs an account and "
        "email set up.",
        "I keep getting 'access denied' [on|when opening] {site} [even though I had access "
        "last week|].",
        "The Authenticator app [isn't sending push notifications|shows the wrong "
        "codes|keeps asking me to approve sign-ins I didn't make].",
        "Can you reset my password? I'm [locked out|stuck] [of {site}|of my email|].",
        "[I'm|I am] stuck in a [login|sign-in] loop on {site}, it keeps sending me back to "
        "the [SSO|login] page.",
        "[Please|Can you] add me to the [{office} distribution list|admins group|shared "
        "mailbox for support].",
        "My username [changed|is wrong] after my name change and I can't sign in.",
        "[I need|Need] [permission|edit rights] on the [project|budget] folder, I can only "
        "read files.",
        "[A colleague|My manager] left and I need access to their [mailbox|OneDrive "
        "files].",
        "[The|My] [2FA|MFA|two-factor] code [is always rejected|never arrives by SMS].",
        "Please [disable|remove] the account for a leaver [who|that] finished [on "
        "Friday|yesterday].",
        "I can't log into {site} with my [new|reset] password, it says invalid "
        "credentials.",
        "My [security key|YubiKey] isn't recognised [at sign-in|anymore] and I can't "
        "get into my account.",
        "[Need|I need] my account unlocked [please|ASAP], I [mistyped|fat-fingered] my "
        "password too many times.",
        "Requesting admin rights on my {device} so I can [change settings|install "
        "tools].",
    ),
    "hardware": (
        "My {device} won't [turn on|power on|boot] at all, [no lights|not even the "
        "fan|just a black screen].",
        "The screen on my {device} is [cracked|flickering|showing coloured lines].",
        "[Some|A few|Several] keys on my [keyboard|{device} keyboard] [stopped "
        "working|are stuck|type the wrong letters].",
        "My {part} [isn't detected|doesn't work|keeps disconnecting] [{when}|after I "
        "plugged it into the dock|].",
        "The [hard drive|disk|SSD] in my {device} [is making clicking noises|keeps "
        "failing its health check|is reporting SMART errors].",
        "My {device} [gets really hot|overheats] and the fan is [loud|screaming] "
        "[{when}|all the time|].",
        "The battery on my {device} [drains in an hour|won't charge past 40%|isn't "
        "charging at all].",
        "The [docking station|dock] [doesn't|won't] power my {part} [anymore|{when}|].",
        "My {device} [randomly shuts down|blue screens] [a few times a day|{when}], I "
        "think it's the hardware.",
        "I spilled [coffee|water|tea] on my {device} [keyboard|] and now [it won't "
        "start|keys stick].",
        "The hinge on my {device} [snapped|is broken] and the screen [wobbles|won't stay "
        "up].",
        "[My|The] {part} [has dead pixels|shows no signal|is blank] even though the "
        "cable is in.",
        "The trackpad on my {device} [stopped responding|jumps around|clicks by "
        "itself].",
        "[The|My] USB ports on my {device} [don't work|are loose|stopped "
        "working] {when}.",
        "My {device} [dropped|fell off the desk] and now [the screen is black|it makes a "
        "rattling noise].",
        "[I need|Can I get] a replacement {part}, [mine is broken|the old one died].",
        "The charger for my {device} [is frayed|stopped working|only works at an "
        "angle].",
        "My {device} makes a [buzzing|whining|clicking] noise [from the fan|near the "
        "disk|when it's busy].",
        "[The|My] webcam [shows a black image|isn't detected] in every app, [the light "
        "doesn't even come on|not just {app}].",
        "My {device} [is|has become] [super|very] slow to boot and the disk light stays "
        "on, [probably|I think] a failing drive.",
    ),
    "software": (
        "{app} [keeps crashing|crashes|closes itself] [when I open it|on startup|{when}].",
        "{app} [shows|gives me|throws] {err} [when I try to open it|on launch|after the "
        "update].",
        "[Can you install {app} on my {device}?|Please install {app} on my {device}.]",
        "The [Windows|macOS|latest] update [failed|won't install] with {err}.",
        "{app} [is frozen|hangs|is not responding] [whenever I open a big file|{when}].",
        "After [the|last night's] update {app} [won't start|looks broken|lost all my "
        "settings].",
        "{app} [says|tells me] my version is out of date but the update [fails|won't "
        "download].",
        "The [{app}|Zoom|Teams] plugin [disappeared|stopped loading] in {app}.",
        "{app} is [extremely|really|so] slow {when}, [it takes minutes to open a "
        "file|everything lags].",
        "I need [an older|a newer|the 64-bit] version of {app} for a [project|client].",
        "{app} [won't open|crashes when I open] [attachments|PDF files|.xlsx files] {since}.",
        "[Installation|Install] of {app} [fails|stops] at [90%|the last step] with {err}.",
        "{app} [keeps asking me to sign in|logs me out] every time I open it.",
        "My {device} [shows|throws] a 'DLL not found' error when I start {app}.",
        "The macros in Excel [stopped working|are blocked] {when}.",
        "{app} [doesn't sync|won't sync] [my files|my calendar|] and shows a [red|yellow] "
        "warning icon.",
        "[Search|The search bar] in {app} [returns nothing|is broken] {when}.",
        "{app} [uses 100% CPU|eats all my memory] and my {device} grinds to a halt.",
        "Could you [uninstall|remove] {app} [from my {device}|], it's not needed anymore.",
        "I get a 'this app can't run on your PC' message [trying to|when I] [open|launch] "
        "{app}.",
        "[My|The] antivirus [keeps quarantining|blocks] {app} [after|since] the update.",
    ),
    "billing": (
        "We were charged twice for [our|the] {product} [this month|on the last "
        "invoice].",
        "[Can you|Please] send [me|us] [a copy of|] invoice {inv}? [I can't find "
        "it|Accounts needs it].",
        "Our invoice [shows|has] {amount} but we agreed on a lower price.",
        "[I'd like|We want|Requesting] a refund for the {product} we [cancelled|never "
        "used].",
        "[We need|Please add] {n} more seats [on|to] our {product}.",
        "[Please|Can you] update the billing address [on our account|on future "
        "invoices] to our {office} office.",
        "The VAT number is missing from invoice {inv}.",
        "Our card was declined [for|on] the {product} renewal, how do we pay [now|by "
        "bank transfer]?",
        "[Can you|Please] add our PO number to invoice {inv} so finance can pay it.",
        "[We want to|Please] downgrade from the {product} [at renewal|next month].",
        "[I was|We were] charged {amount} [for a plan we didn't order|after "
        "cancelling].",
        "[When|What date] does our {product} renew and how much will it cost?",
        "[We have|There are] {n} unused licences, can we get a credit for them?",
        "The receipt for {amount} [doesn't show|is missing] our company name.",
        "[Please|Can you] switch us from monthly to annual billing [for the {product}|].",
        "Invoice {inv} [is overdue|got a late fee] but we paid it [last week|on the "
        "1st].",
        "[Why did|How come] our bill go up by {amount} this month?",
        "[How do I|Can I] change the credit card on file for our subscription?",
        "We need a quote for [{n}|extra] seats on our {product} [for next quarter|before the "
        "renewal].",
        "The licence count on our invoice is wrong, we only have {n} users.",
    ),
    "escalate": (
        "I clicked a link in an email [that looked like|pretending to be from] "
        "[IT|the bank|Microsoft|DocuSign] and [typed in|entered] my password. [I think "
        "it was phishing|Pretty sure it was a phishing scam].",
        "[We got|I received] an email from someone pretending to be {exec} asking [me|us] "
        "to buy gift cards [urgently|].",
        "All the files on [my {device}|the shared drive] [got renamed to|now end in] "
        ".locked and there's a ransom note.",
        "[I think|We think] customer data was [leaked|emailed to the wrong "
        "client|exposed], [we may have a data breach|this could be a breach].",
        "This is the [third|fourth|fifth] time I've [raised|reported] this and nothing "
        "[is fixed|has happened]. I want to speak to a manager [now|today].",
        "[If this isn't resolved|Unless this is fixed] [by Friday|today|this week] "
        "[our lawyers|our legal team] will be in touch.",
        "[The whole|Our entire] {office} office is down, [nobody|none of us] can [work|log "
        "in|access anything] [right now|for {hours}].",
        "[There's|I can smell] [smoke|a burning smell] coming from [my {device}|the "
        "server room|the printer] [right now|].",
        "{exec}'s {device} [won't boot|died] and [they're|she's|he's] presenting to the "
        "board in [20 minutes|half an hour].",
        "Someone is [sending emails I didn't write|logging in from places I don't "
        "recognise] from my account, I think I've been hacked.",
        "I lost my {device} [on the train|at the airport|in a taxi] and it has [client "
        "data|payroll files] on it.",
        "[Outage|Major outage]: {site} is down for {people} [across all offices|in "
        "{office}] [for {hours}|].",
        "The battery in my {device} is [swollen|bulging] and [hot|the case is "
        "splitting], is it safe?",
        "[We're|We are] [losing money|losing orders] every minute, [the payment "
        "system|checkout|the order system] is down for all customers.",
        "[I'm|I am] [absolutely|extremely] furious, [your team|IT] has ignored ticket "
        "{ticket} for [two weeks|a month]. Escalate this to your manager.",
        "[Our|The] [auditor|regulator] found [patient|customer] records on a public "
        "[link|share], we need to report this.",
        "[A stranger|Someone I don't know] [was|is] [tailgating into|walking around] the "
        "server room [without a badge|].",
        "{exec} needs [urgent|immediate] help, [their|her|his] email [isn't "
        "working|stopped syncing] before [a board meeting|an investor call].",
        "[An|A suspicious] USB stick [was found|turned up] in the car park and someone "
        "[plugged it in|already opened it] on their {device}.",
        "[Nobody|None of us] in {office} can [send email|use the phones|get online] and "
        "we have customers waiting.",
        "I received a [threatening|legal] letter about [a data protection "
        "complaint|unlicensed software] and need someone senior to handle it.",
        "[The|Our] antivirus flagged [malware|a trojan] on {n} machines at once in "
        "{office}.",
    ),
}

# Extra sentences that point at the label (second sentence of a ticket).
CONTEXTS: dict[str, tuple[str, ...]] = {
    "network": (
        "Other people on my floor seem fine.",
        "It works on my phone hotspot though.",
        "I already tried forgetting the network and rejoining.",
        "Ethernet is fine, only wireless is affected.",
        "The router lights look normal.",
        "Turning wifi off and on didn't help.",
        "I'm working from home today.",
    ),
    "printer": (
        "I've already turned it off and on again.",
        "The display on the printer says ready.",
        "Other people can print to it fine.",
        "There's plenty of paper in the trays.",
        "I need these printed for a meeting.",
    ),
    "account": (
        "I tried the self-service reset but it didn't send me an email.",
        "My manager already approved it.",
        "I'm pretty sure I'm typing it correctly.",
        "I'm working remotely so I can't come to the desk.",
        "It worked fine last Friday.",
    ),
    "hardware": (
        "It's about three years old.",
        "I've tried a different cable and power socket.",
        "It's still under warranty I think.",
        "I can bring it to the IT desk today.",
        "Restarting made no difference.",
    ),
    "software": (
        "I've already restarted my {device}.",
        "I'm on the latest version as far as I know.",
        "It was working fine before the update.",
        "I need it for a deadline today.",
        "Other apps seem fine.",
    ),
    "billing": (
        "Our account number is {acct}.",
        "Finance is asking me about it.",
        "We'd like this sorted before month end.",
        "I'm the account owner.",
        "Please reply to the finance team as well.",
    ),
    "escalate": (
        "Please treat this as urgent.",
        "I haven't told anyone else yet.",
        "This can't wait until tomorrow.",
        "Please get someone senior on this immediately.",
        "I don't know what else to do.",
    ),
}

GENERIC_CONTEXTS: tuple[str, ...] = (
    "Started [this morning|yesterday|after the update|on Monday].",
    "This has been happening {since}.",
    "I already restarted [twice|a couple of times].",
    "I have a client [call|meeting] at [2pm|3|11].",
    "Not sure if this is the right queue.",
    "My colleague said to raise a ticket.",
    "Ticket {ticket} was closed but the problem is back.",
)

OPENINGS: tuple[str, ...] = (
    "", "", "", "", "", "Hi,", "Hi team,", "Hello,", "Hey,", "hey", "Good morning,",
    "Hi IT,", "Hi there,", "Morning,", "Hello support,", "Quick one:", "Urgent:",
    "Hi all,", "Dear support,", "Help!",
)

CLOSINGS: tuple[str, ...] = (
    "", "", "", "", "", "Thanks!", "Thanks in advance.", "Please help.", "cheers",
    "Any ideas?", "Can someone take a look?", "Thank you.", "thx", "Sent from my iPhone",
    "Appreciate it.", "Let me know what you need from me.", "Thanks, Sam", "Regards, Priya",
    "Kind regards.", "Can you call me?",
)

# First words that must keep their capital after "Hi," (pronoun "I", product names).
KEEP_CAPITAL = frozenset(
    {"I", "I'm", "I've", "I'd", "I'll", "Windows", "Outlook", "Teams", "Excel", "Word",
     "Zoom", "Slack", "Chrome", "Adobe", "SAP", "Salesforce", "PowerPoint", "QuickBooks",
     "Firefox", "Tableau", "AutoCAD", "Jira", "Confluence", "Finance"}
)

# PII fragments that a redaction step should find.
FIRST_NAMES = ("jane", "omar", "li.wei", "maria", "tom", "aisha", "lukas", "sofia", "raj")
DOMAINS = ("example.com", "acme-corp.example", "mail.example.org", "contoso.example")
PHONES = (
    "+1 415-555-0132", "(212) 555-0187", "+44 20 7946 0958", "415.555.0199",
    "+1 (646) 555-0144", "555-0123", "+49 30 901820",
)
IPV4 = ("10.20.3.14", "192.168.1.57", "172.16.40.2", "10.0.12.201", "192.168.0.254")
IPV6 = ("2001:db8:85a3::8a2e:370:7334", "fe80::1c2b:3aff:fe4d:9e01", "2001:db8::42")
CARDS = ("4111 1111 1111 1111", "5555 5555 5555 4444", "4242 4242 4242 4242")

# fmt: on


def pii_sentence(label: str, rng: random.Random) -> str:
    """A sentence carrying one piece of PII that fits ``label``."""
    email = f"{rng.choice(FIRST_NAMES)}@{rng.choice(DOMAINS)}"
    options = [
        f"You can reach me at {email}.",
        f"Call me on {rng.choice(PHONES)}.",
        f"My email is {email} if you need it.",
        f"Best number to reach me is {rng.choice(PHONES)}.",
    ]
    if label in ("network", "software", "printer"):
        options.append(f"My machine's IP is {rng.choice(IPV4)}.")
    if label == "network":
        options.append(f"ipconfig shows {rng.choice(IPV4)} but the gateway doesn't answer.")
        options.append(f"It only has the IPv6 address {rng.choice(IPV6)}, no IPv4.")
    if label == "printer":
        options.append(f"The printer's address is {rng.choice(IPV4)}.")
    if label == "billing":
        options.append(f"The card we used was {rng.choice(CARDS)}.")
        options.append(f"It was charged to card {rng.choice(CARDS)}, please check.")
        options.append(f"Send the invoice to {email} please.")
    return rng.choice(options)


# fmt: off
TYPOS: dict[str, str] = {
    "receive": "recieve", "password": "pasword", "definitely": "definately",
    "connect": "conect", "because": "becuase", "doesn't": "doesnt", "can't": "cant",
    "won't": "wont", "printer": "priner", "keyboard": "keybaord", "again": "agian",
    "the": "teh", "account": "acount", "working": "wokring", "invoice": "invocie",
    "I'm": "im", "please": "pls", "really": "realy",
}

# fmt: on


def add_typo(text: str, rng: random.Random) -> str:
    """Introduce one realistic typo (known misspelling or swapped letters)."""
    words = text.split(" ")
    known = [i for i, w in enumerate(words) if w.strip(".,!?:").lower() in TYPOS]
    if known and rng.random() < 0.7:
        i = rng.choice(known)
        core = words[i].strip(".,!?:")
        words[i] = words[i].replace(core, TYPOS[core.lower()], 1)
        return " ".join(words)
    long_words = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 5]
    if not long_words:
        return text
    i = rng.choice(long_words)
    w = words[i]
    j = rng.randint(1, len(w) - 3)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def join_opening(opening: str, body: str) -> str:
    """Prefix a greeting; after "Hi," or "hey" the body continues in lower case."""
    if not opening:
        return body
    first = body.split(" ", 1)[0]
    keep = first in KEEP_CAPITAL or any(c.isupper() for c in first[1:])
    if not keep and (opening.endswith(",") or opening[-1].isalpha()):
        body = body[:1].lower() + body[1:]
    return f"{opening} {body}"


def make_ticket(label: str, rng: random.Random) -> str:
    """Assemble one ticket for ``label`` from independent parts."""
    bind = _SlotBinder(rng)  # one device / app / printer per ticket
    parts = [bind(rng.choice(CORES[label]))]
    roll = rng.random()
    if roll < 0.45:
        parts.append(bind(rng.choice(CONTEXTS[label])))
    # Generic context ("I have a client call at 3") reads oddly on security incidents.
    if label != "escalate" and 0.3 < roll < 0.6:
        parts.append(bind(rng.choice(GENERIC_CONTEXTS)))
    if rng.random() < 0.055:
        parts.append(pii_sentence(label, rng))
    body = " ".join(_capitalise(p) for p in parts)
    text = join_opening(rng.choice(OPENINGS), body)
    closing = rng.choice(CLOSINGS)
    if closing:
        text = f"{text} {closing}"
    style = rng.random()
    if style < 0.07:
        text = text.lower()
    elif style < 0.12:
        text = text.rstrip(".")
    if rng.random() < 0.12:
        text = add_typo(text, rng)
    return text


def norm_key(text: str) -> str:
    """Dedup key: case-, punctuation- and whitespace-insensitive."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def generate_intents() -> dict[str, list[dict[str, str]]]:
    rng = random.Random(INTENT_SEED)
    seen: set[str] = set()
    forbidden = {norm_key(t) for t in FORBIDDEN_TEXTS}
    splits: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for label, counts in INTENT_COUNTS.items():
        need = sum(counts)
        rows: list[str] = []
        attempts = 0
        while len(rows) < need:
            attempts += 1
            if attempts > need * 200:
                raise RuntimeError(f"could not generate {need} unique rows for {label}")
            text = make_ticket(label, rng)
            key = norm_key(text)
            n_words = len(text.split())
            if key in seen or not 6 <= n_words <= 60:
                continue
            if any(f in key for f in forbidden):
                continue
            seen.add(key)
            rows.append(text)
        start = 0
        for split, count in zip(SPLITS, counts, strict=True):
            splits[split].extend({"text": t, "label": label} for t in rows[start : start + count])
            start += count
    for split in SPLITS:
        rng.shuffle(splits[split])
    return splits


# ---------------------------------------------------------------------------
# Chat dialogues
# ---------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You are a concise IT support assistant. Give the most likely fix first, then the "
    "next step, and say when to escalate to a human."
)

# Each topic: user phrasings, the first answer (most likely fix + fallback + when to
# escalate), a follow-up "still broken" phrasing and the second-turn answer.
# ``{x}`` slots resolve to the same value in every message of one dialogue.
CHAT_TOPICS: tuple[dict[str, tuple[str, ...]], ...] = (
    {
        "user": (
            "My {device} won't connect to the {wifi}.",
            "[Can't|I can't] get on the {wifi} with my {device} [{when}|].",
            "{device} keeps saying it can't join the {wifi}, what do I do?",
        ),
        "fix": (
            "Forget the {wifi} on your {device}, toggle Wi-Fi off and on, then rejoin "
            "with your normal sign-in.",
            "Turn Wi-Fi off and on on your {device}, then forget and rejoin the {wifi}.",
        ),
        "next": (
            "If it still fails, restart the {device} and try a cable or your phone "
            "hotspot. If nothing connects, contact the service desk so they can check "
            "your device certificate.",
        ),
        "still": ("Still can't connect.", "Done that, no luck.", "It still fails to join."),
    },
    {
        "user": (
            "VPN keeps disconnecting [when I work from home|every few minutes].",
            "[The|My] VPN won't connect, it just times out.",
            "VPN is stuck on connecting [{when}|].",
        ),
        "fix": (
            "Quit the VPN client completely, restart your home router, then reconnect "
            "on a wired or strong Wi-Fi connection.",
        ),
        "next": (
            "If it still drops, reinstall the VPN client from the company portal. If "
            "colleagues see the same thing, it may be an outage, so raise it with the "
            "service desk.",
        ),
        "still": ("Still dropping.", "Tried that, it still times out."),
    },
    {
        "user": (
            "{site} won't load but other websites work.",
            "I can't reach {site} [from home|over VPN|{when}].",
        ),
        "fix": (
            "Connect to the VPN first, since {site} is internal, then clear your browser "
            "cache and try a private window.",
        ),
        "next": (
            "If it still won't load, run 'ipconfig /flushdns' and retry. If others can't "
            "reach {site} either, report it to the service desk as a possible outage.",
        ),
        "still": ("It still won't load.", "VPN is on and it still doesn't work."),
    },
    {
        "user": (
            "The internet is really slow {when}.",
            "[Everything|Pages] [takes|take] forever to load on the {wifi}.",
        ),
        "fix": (
            "Move closer to an access point or plug in a network cable, and pause large "
            "downloads or cloud syncs.",
        ),
        "next": (
            "If it's still slow, restart your {device} and run a speed test. If the "
            "whole office is slow, escalate to the service desk as a network issue.",
        ),
        "still": ("Still slow on a cable.", "Speed test shows 2 Mbps."),
    },
    {
        "user": (
            "{printer} shows as offline.",
            "My documents won't print, {printer} says offline.",
        ),
        "fix": (
            "Check {printer} is on and shows ready, then remove it from your printers "
            "list and add it again.",
        ),
        "next": (
            "If it's still offline, restart the printer and your {device}. If nobody can "
            "print to it, log a ticket so IT can check it on the network.",
        ),
        "still": ("Still offline.", "Re-added it, still says offline."),
    },
    {
        "user": (
            "{printer} keeps jamming.",
            "Paper jam on {printer} [and I can't clear it|again].",
        ),
        "fix": (
            "Open every tray and door, gently pull jammed paper out in the direction it "
            "feeds, and reload with a fresh, flat stack.",
        ),
        "next": (
            "If the jam warning stays, power-cycle the printer. If it keeps jamming or "
            "you see torn pieces inside, log a ticket for a technician; don't force it "
            "open.",
        ),
        "still": ("Jam light is still on.", "Cleared it, it jammed again."),
    },
    {
        "user": (
            "My print jobs are stuck in the queue.",
            "I sent a document to {printer} and nothing comes out.",
        ),
        "fix": (
            "Open the print queue, cancel the stuck jobs, then restart your {device} and "
            "print again.",
        ),
        "next": (
            "If jobs still stick, remove and re-add {printer}. If the queue is stuck for "
            "everyone, contact the service desk to restart the print server.",
        ),
        "still": ("Queue is stuck again.", "Cancelled them, still nothing prints."),
    },
    {
        "user": (
            "{printer} prints faded [pages|pages with streaks].",
            "Prints from {printer} have lines down the page.",
        ),
        "fix": (
            "Take out the toner cartridge, rock it gently side to side and reinsert it, "
            "then print a test page.",
        ),
        "next": (
            "If prints are still faded, replace the toner. If a new toner doesn't help, "
            "log a ticket so a technician can check the drum.",
        ),
        "still": ("Still faded.", "New toner, same streaks."),
    },
    {
        "user": (
            "I forgot my password.",
            "[I'm|I am] locked out of my account.",
            "My password expired and I can't log in.",
        ),
        "fix": (
            "Use the self-service reset at the sign-in page and verify with your MFA "
            "method, then wait 15 minutes if you're locked out.",
        ),
        "next": (
            "If the reset fails or you no longer have your MFA device, call the service "
            "desk; they will verify your identity and reset it.",
        ),
        "still": ("The reset page gives an error.", "I don't get the code."),
    },
    {
        "user": (
            "I got a new phone and my MFA [codes|prompts] [don't work|go to the old one].",
            "How do I move my authenticator to a new phone?",
        ),
        "fix": (
            "If you still have the old phone, sign in to the security info page and add "
            "the new phone as a method, then remove the old one.",
        ),
        "next": (
            "If the old phone is gone, contact the service desk; they'll verify your "
            "identity and issue a temporary access pass.",
        ),
        "still": ("My old phone is wiped.", "I don't have the old phone anymore."),
    },
    {
        "user": (
            "I need access to {site}.",
            "I get 'access denied' on {site}.",
            "How do I get access to the Finance shared drive?",
        ),
        "fix": (
            "Request access through the access request form and name your manager as "
            "approver; access appears after you sign out and back in.",
        ),
        "next": (
            "If it's approved but still denied, sign out fully and retry after an hour. "
            "If it's urgent, ask the service desk to chase the owner.",
        ),
        "still": ("It's approved and still denied.", "Still says access denied."),
    },
    {
        "user": (
            "I'm stuck in a sign-in loop on {site}.",
            "{site} keeps sending me back to the login page.",
        ),
        "fix": ("Clear cookies for {site} or open it in a private window, then sign in again.",),
        "next": (
            "If the loop continues, check your device clock is correct and try another "
            "browser. If it still fails, contact the service desk with a screenshot.",
        ),
        "still": ("Still looping.", "Private window does the same."),
    },
    {
        "user": (
            "My {device} won't turn on.",
            "{device} is dead, no lights at all.",
        ),
        "fix": (
            "Plug in the original charger for 15 minutes, then hold the power button for "
            "15 seconds and try again.",
        ),
        "next": (
            "If it still won't start, try a different socket and charger. If there's "
            "still no sign of life, book a hardware repair with the service desk.",
        ),
        "still": ("Still nothing.", "No lights even on charge."),
    },
    {
        "user": (
            "My {part} isn't detected.",
            "The {part} stopped working [{when}|after I docked].",
        ),
        "fix": (
            "Unplug the {part} and plug it straight into your {device}, not the dock, "
            "then restart.",
        ),
        "next": (
            "If it works directly, update or replace the dock. If it's not detected "
            "anywhere, request a replacement {part} from the service desk.",
        ),
        "still": ("Not detected directly either.", "Still doesn't show up."),
    },
    {
        "user": (
            "My {device} overheats and the fan is loud.",
            "{device} gets really hot {when}.",
        ),
        "fix": (
            "Keep the {device} on a hard surface with the vents clear, and close heavy "
            "apps and browser tabs.",
        ),
        "next": (
            "If it's still hot when idle, check Task Manager for a runaway process. If "
            "it shuts down from heat, stop using it and book a hardware check.",
        ),
        "still": ("Still hot when idle.", "It shut down by itself."),
    },
    {
        "user": (
            "The battery on my {device} won't charge.",
            "{device} battery drains really fast.",
        ),
        "fix": (
            "Try the original charger in a different socket and check the charging "
            "light, then restart the {device}.",
        ),
        "next": (
            "If it still won't hold charge, run the battery health check. If the battery "
            "looks swollen, stop using it and contact the service desk immediately.",
        ),
        "still": ("Still not charging.", "Health check says replace."),
    },
    {
        "user": (
            "The screen on my {device} is flickering.",
            "My {part} shows no signal.",
        ),
        "fix": ("Reseat the display cable at both ends and try a different cable or port.",),
        "next": (
            "If it still flickers, update the graphics driver. If the problem continues "
            "on another screen or cable, book a hardware repair.",
        ),
        "still": ("Still flickering.", "Different cable, same problem."),
    },
    {
        "user": (
            "{app} keeps crashing.",
            "{app} closes itself [when I open it|{when}].",
        ),
        "fix": (
            "Update {app} to the latest version and restart your {device}.",
            "Restart your {device}, then install any pending {app} updates.",
        ),
        "next": (
            "If it still crashes, repair or reinstall {app} from the company portal. If "
            "that fails, send the error details to the service desk.",
        ),
        "still": ("Still crashes after updating.", "Reinstalled, still crashes."),
    },
    {
        "user": (
            "{app} shows {err} [on launch|after the update].",
            "I get {err} when I open {app}.",
        ),
        "fix": (
            "Restart your {device} and run {app} once as normal; {err} is often a "
            "locked or half-installed file.",
        ),
        "next": (
            "If {err} returns, repair {app} from Settings or the company portal. If it "
            "persists, send the service desk a screenshot of the error.",
        ),
        "still": ("Same error.", "Still getting {err}."),
    },
    {
        "user": (
            "Can you install {app} on my {device}?",
            "How do I get {app} installed?",
        ),
        "fix": (
            "Open the company portal, search for {app} and click Install; no admin "
            "rights are needed.",
        ),
        "next": (
            "If {app} isn't listed, submit a software request with a business reason and "
            "your manager's approval; the service desk will install it.",
        ),
        "still": ("It's not in the portal.", "{app} isn't listed there."),
    },
    {
        "user": (
            "The Windows update failed with {err}.",
            "Windows updates won't install on my {wdevice}.",
        ),
        "fix": (
            "Restart the {wdevice}, connect to power and a stable network, then run "
            "Windows Update again.",
        ),
        "next": (
            "If it fails again, run the Windows Update troubleshooter. If the update "
            "still fails, send the error code to the service desk.",
        ),
        "still": ("Failed again.", "Troubleshooter found nothing."),
    },
    {
        "user": (
            "{syncapp} won't sync my files.",
            "{syncapp} shows a red sync error [{when}|].",
        ),
        "fix": ("Sign out of the sync client and back in, then check you have free disk space.",),
        "next": (
            "If it still won't sync, pause and resume syncing or reset the client. If "
            "files are missing, contact the service desk before deleting anything.",
        ),
        "still": ("Still not syncing.", "Some files are missing now."),
    },
    {
        "user": (
            "We were charged twice [this month|for our subscription].",
            "I see two charges of {amount} on our card.",
        ),
        "fix": (
            "Check both charges on the billing page; a pending duplicate usually drops "
            "off within 5 business days.",
        ),
        "next": (
            "If both charges settle, reply with the invoice numbers and the billing team "
            "will issue a refund. A person in billing must approve refunds.",
        ),
        "still": ("Both charges went through.", "It's been a week."),
    },
    {
        "user": (
            "Our invoice shows {amount} but we agreed a lower price.",
            "Why is invoice {inv} higher than our quote?",
        ),
        "fix": (
            "Compare the invoice with your signed quote; introductory prices often end at renewal.",
        ),
        "next": (
            "If it doesn't match what you agreed, reply with the quote and invoice "
            "number; a billing agent will correct it and issue a credit.",
        ),
        "still": ("It doesn't match the quote.", "The quote was for this year."),
    },
    {
        "user": (
            "Can I get a copy of invoice {inv}?",
            "Where do I download our invoices?",
        ),
        "fix": ("Go to Billing > Invoices in the admin portal and download the PDF.",),
        "next": (
            "If it's missing or wrong, send the invoice number to billing; they can "
            "reissue it with your PO or VAT number.",
        ),
        "still": ("It's not listed.", "It's missing our VAT number."),
    },
    {
        "user": (
            "We need {n} more licences.",
            "How do I add seats to our plan?",
        ),
        "fix": (
            "An account admin can add seats under Billing > Subscriptions; the cost is prorated.",
        ),
        "next": (
            "If you're not an admin, ask your account owner. For a quote or annual "
            "contract changes, contact the billing team.",
        ),
        "still": ("I'm not an admin.", "The option is greyed out."),
    },
    {
        "user": (
            "I want a refund for a plan we cancelled.",
            "We were charged {amount} after cancelling.",
        ),
        "fix": (
            "Check the cancellation date on the billing page; charges after it are "
            "usually refunded automatically.",
        ),
        "next": (
            "If it wasn't refunded, reply with the invoice number and cancellation date; "
            "a billing agent will review and approve the refund.",
        ),
        "still": ("Nothing was refunded.", "It's been two weeks."),
    },
    {
        "user": (
            "I clicked a link in a phishing email and entered my password.",
            "I think I fell for a phishing email.",
        ),
        "fix": (
            "Change your password now from a trusted device and report the email with "
            "the Report Phishing button.",
        ),
        "next": (
            "Then contact the security team immediately, even if nothing seems wrong; "
            "a human needs to check your account for misuse.",
        ),
        "still": ("I changed it, what now?", "Do I need to do anything else?"),
    },
    {
        "user": (
            "My files were renamed to .locked and there's a ransom note.",
            "I think my {device} has ransomware.",
        ),
        "fix": ("Disconnect the {device} from Wi-Fi and any cables now, but don't turn it off.",),
        "next": (
            "Call the security team immediately; this needs a human straight away. "
            "Don't pay, delete files or plug in any drives.",
        ),
        "still": ("It's disconnected.", "Done, what next?"),
    },
    {
        "user": (
            "The whole {office} office is down.",
            "Nobody in {office} can [log in|get online].",
        ),
        "fix": (
            "This is a major incident: call the service desk hotline now rather than "
            "raising a ticket.",
        ),
        "next": (
            "Share the office, start time and who is affected. An engineer will take "
            "over and post updates on the status page.",
        ),
        "still": ("Who do I call?", "What do I tell them?"),
    },
    {
        "user": (
            "I want to speak to a manager, this is the third time I've reported this.",
            "Nobody has fixed ticket {ticket}, escalate this.",
        ),
        "fix": (
            "I'm sorry it's still unresolved. I've flagged this for a service desk "
            "manager, who will contact you today.",
        ),
        "next": (
            "Please reply with your ticket number so the manager has the full history "
            "when they call.",
        ),
        "still": ("When will they call?", "I've waited long enough."),
    },
    {
        "user": (
            "I lost my {device} on the train.",
            "My {device} was stolen [from my car|at the airport].",
        ),
        "fix": (
            "Report it to the service desk now so they can lock and wipe the {device} remotely.",
        ),
        "next": (
            "Change your password from another device. If it held client data, a human "
            "from security must assess it.",
        ),
        "still": ("It has client data.", "Is that all?"),
    },
    {
        "user": (
            "There's smoke coming from my {device}.",
            "My {device} battery is swollen.",
        ),
        "fix": ("Unplug it and move away from it now; don't open it or keep using it.",),
        "next": (
            "If there's smoke or fire, follow the building fire procedure. Then report it "
            "to facilities and the service desk for a safe replacement.",
        ),
        "still": ("It's unplugged.", "What happens next?"),
    },
)

FOLLOWUP_PREFIX: tuple[str, ...] = ("", "", "Thanks. ", "Ok. ", "Hmm, ")


def estimate_tokens(text: str) -> int:
    """Rough BPE token estimate (errs high): words and punctuation, plus 15%."""
    pieces = re.findall(r"\w+|[^\w\s]", text)
    return int(len(pieces) * 1.15) + 1


def dialogue_tokens(messages: list[dict[str, str]]) -> int:
    return sum(estimate_tokens(m["content"]) + 5 for m in messages)


def make_dialogue(rng: random.Random, two_turn: bool) -> list[dict[str, str]]:
    topic = rng.choice(CHAT_TOPICS)
    bind = _SlotBinder(rng)
    user = _capitalise(bind(rng.choice(topic["user"])))
    user = join_opening(rng.choice(("", "", "", "Hi,", "Hello,", "Hey,")), user)
    fix = _capitalise(bind(rng.choice(topic["fix"])))
    nxt = _capitalise(bind(rng.choice(topic["next"])))
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    if two_turn:
        still = rng.choice(FOLLOWUP_PREFIX) + _capitalise(bind(rng.choice(topic["still"])))
        messages += [
            {"role": "assistant", "content": fix},
            {"role": "user", "content": still},
            {"role": "assistant", "content": nxt},
        ]
    else:
        messages.append({"role": "assistant", "content": f"{fix} {nxt}"})
    return messages


def generate_chat() -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(CHAT_SEED)
    seen: set[str] = set()
    out: dict[str, list[dict[str, Any]]] = {}
    for split, count in zip(SPLITS, CHAT_COUNTS, strict=True):
        n_two = round(count * TWO_TURN_SHARE)
        rows: list[dict[str, Any]] = []
        attempts = 0
        while len(rows) < count:
            attempts += 1
            if attempts > count * 500:
                raise RuntimeError(f"could not generate {count} unique dialogues for {split}")
            messages = make_dialogue(rng, two_turn=len(rows) < n_two)
            key = norm_key(" | ".join(m["content"] for m in messages[1:]))
            if key in seen or dialogue_tokens(messages) > MAX_DIALOGUE_TOKENS:
                continue
            if any(len(m["content"].split()) > 60 for m in messages if m["role"] == "assistant"):
                continue
            seen.add(key)
            rows.append({"messages": messages})
        rng.shuffle(rows)
        out[split] = rows
    return out


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def render(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build() -> dict[Path, str]:
    """Every generated file and its exact contents."""
    files: dict[Path, str] = {}
    datasets: tuple[tuple[Path, Callable[[], dict[str, Any]]], ...] = (
        (INTENTS_DIR, generate_intents),
        (CHAT_DIR, generate_chat),
    )
    for directory, generator in datasets:
        for split, rows in generator().items():
            files[directory / f"{split}.jsonl"] = render(rows)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the files on disk differ")
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        stale = [
            p
            for p, text in files.items()
            if not p.is_file() or p.read_bytes() != text.encode("utf-8")
        ]
        for p in stale:
            print(f"out of date: {p.relative_to(DATA_DIR)}", file=sys.stderr)
        if stale:
            print("run: python examples/data/generate.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        print(f"wrote {path.relative_to(DATA_DIR)} ({text.count(chr(10))} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
