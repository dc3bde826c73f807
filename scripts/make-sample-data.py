#!/usr/bin/env python3
"""Builds dialora's sample counselling dataset (EmoLLM format) from hand-written pieces.

The counsellor in this data has one recognisable style: it names the feeling it hears,
validates it, offers one small concrete idea, and ends with a single gentle question. That
style is what fine-tuning should visibly teach the base model.

Writes data/counsel_train.jsonl (training; dataprep takes a validation split from it) and
data/counsel_heldout.jsonl (held-out conversations for `infer --compare`) and
data/counsel_study.jsonl (held-out questions with reference replies in the counsellor's style,
for the study's answer scores: the article's two-turn question first). Deterministic.
Usage: python3 scripts/make-sample-data.py
"""
import json
import random
from pathlib import Path

SYSTEM = "You are Sage, a warm and supportive counselling assistant."

# topic: (feeling, openers, follow-up details, small ideas)
TOPICS = {
    "exam stress": ("overwhelmed", [
        "My exams start next week and I can't focus on anything.",
        "I keep failing practice tests and I'm scared of the real exam.",
        "Everyone else seems ready for finals except me.",
    ], ["I study all day but nothing sticks.", "My parents expect top grades.", "I haven't slept properly in days."],
     ["breaking revision into 25-minute blocks with short breaks", "writing down the three topics that matter most tomorrow",
      "a short walk before you sit down to study"]),
    "burnout at work": ("exhausted", [
        "I've been working late every night and I feel empty.",
        "My job is draining me and I dread Mondays.",
        "I can't keep up with my workload anymore.",
    ], ["My manager keeps adding tasks.", "I haven't taken a day off in months.", "I snap at people when I get home."],
     ["choosing one task you can hand back or postpone this week", "protecting one evening this week for rest",
      "telling your manager which deadline is at risk"]),
    "loneliness": ("lonely", [
        "I moved to a new city and I don't know anyone.",
        "I spend most weekends alone and it's getting to me.",
        "I feel invisible, like nobody would notice if I disappeared.",
    ], ["My old friends don't call anymore.", "I'm shy with new people.", "I eat dinner alone every night."],
     ["joining one small group that meets regularly, like a class or a club", "sending one message to an old friend today",
      "saying hello to a neighbour or colleague you see often"]),
    "a breakup": ("heartbroken", [
        "My partner ended our relationship and I can't stop crying.",
        "We broke up a month ago and I still check their profile every day.",
        "I feel like I'll never find someone again after this breakup.",
    ], ["We were together for four years.", "I keep replaying our last conversation.", "All our friends are shared."],
     ["muting their profile for a while", "writing down what you need right now, not what you lost",
      "planning something small for the evenings that feel longest"]),
    "trouble sleeping": ("worn out", [
        "I lie awake every night with my mind racing.",
        "I wake up at 3am and can't get back to sleep.",
        "I'm so tired during the day but I can't sleep at night.",
    ], ["I scroll on my phone until late.", "I worry about tomorrow as soon as the lights are off.", "Coffee is the only thing keeping me going."],
     ["a screen-free half hour before bed", "keeping a notebook by the bed to park worries",
      "getting up at the same time each day, even after a bad night"]),
    "family conflict": ("hurt", [
        "My parents and I argue every time we talk.",
        "My sister and I haven't spoken in months after a fight.",
        "I feel like my family never listens to me.",
    ], ["They criticise my choices.", "Holidays are coming and I'm dreading them.", "I end up shouting and then feel guilty."],
     ["picking one calm moment to say how you feel, using 'I' statements", "setting a time limit on difficult visits",
      "writing a letter you don't have to send"]),
    "grief": ("deeply sad", [
        "My grandmother died last month and I can't accept it.",
        "I lost my dog recently and the house feels so empty.",
        "It's been a year since my father passed and it still hurts.",
    ], ["I feel guilty for laughing sometimes.", "People expect me to be over it.", "I keep her messages on my phone."],
     ["setting aside a moment each day to remember them", "talking to someone who knew them too",
      "letting yourself have both sad days and lighter days"]),
    "social anxiety": ("anxious", [
        "I panic before every meeting where I have to speak.",
        "Parties make me so nervous that I stay home.",
        "I replay every conversation afterwards and feel embarrassed.",
    ], ["My heart races and my face goes red.", "I think everyone is judging me.", "I cancel plans at the last minute."],
     ["preparing one sentence you want to say before the meeting", "staying for just thirty minutes at the next event",
      "noticing the evidence for and against the thought that everyone is judging you"]),
    "imposter feelings": ("inadequate", [
        "I got promoted but I feel like a fraud.",
        "Everyone at university seems smarter than me.",
        "I'm waiting for people to realise I don't belong here.",
    ], ["I double-check everything three times.", "I never speak up in meetings.", "Praise makes me uncomfortable."],
     ["keeping a short list of things you did well each week", "asking one colleague how they felt when they started",
      "treating mistakes as information rather than proof"]),
    "parenting stress": ("stretched thin", [
        "My toddler's tantrums are wearing me down.",
        "I feel like I'm failing as a parent.",
        "Balancing work and my kids leaves nothing for me.",
    ], ["I lose my patience and then feel terrible.", "My partner works away a lot.", "I haven't had time for myself in ages."],
     ["asking for one hour of help this week", "a two-minute pause to breathe before you respond",
      "lowering the bar on one chore so you have a little time back"]),
    "health worries": ("frightened", [
        "I keep worrying that something is wrong with my body.",
        "I'm waiting for test results and I can't think of anything else.",
        "Every small pain makes me think it's something serious.",
    ], ["I search my symptoms online for hours.", "My doctor says I'm fine but I don't believe it.", "I can't concentrate at work."],
     ["limiting symptom searching to once a day", "writing your questions down for your next appointment",
      "a slow breathing exercise when the worry spikes"]),
    "procrastination": ("stuck", [
        "I keep putting off my thesis and the deadline is close.",
        "I waste whole days and then hate myself for it.",
        "I know what I need to do but I just can't start.",
    ], ["I open my laptop and end up watching videos.", "The task feels too big.", "I only work in a last-minute panic."],
     ["starting with a five-minute version of the task", "deciding the very first step, as small as opening the file",
      "working somewhere with fewer distractions for one session"]),
    "panic attacks": ("scared", [
        "I had a panic attack on the train and now I'm afraid to travel.",
        "My chest gets tight and I feel like I can't breathe.",
        "I'm scared of having another panic attack in public.",
    ], ["It came out of nowhere.", "I thought I was having a heart attack.", "I avoid crowded places now."],
     ["slow breathing, in for four and out for six", "naming five things you can see when it starts",
      "reminding yourself that the wave of panic peaks and passes"]),
    "low motivation": ("flat", [
        "I don't enjoy anything anymore.",
        "I can't get out of bed in the mornings.",
        "Nothing seems worth the effort lately.",
    ], ["My hobbies feel pointless.", "I stay in my room most of the day.", "I've stopped replying to friends."],
     ["one small pleasant activity today, even for ten minutes", "getting some daylight in the morning",
      "letting a trusted person know how flat things feel"]),
    "anger": ("frustrated", [
        "I lose my temper over small things.",
        "I said something awful to a friend when I was angry.",
        "I feel angry all the time and I don't know why.",
    ], ["Afterwards I feel ashamed.", "Traffic and queues set me off.", "My partner says I'm hard to be around."],
     ["stepping away for a few minutes when you notice the heat rising", "noticing what happened just before you got angry",
      "apologising once the moment has cooled"]),
    "money worries": ("worried", [
        "I can't stop worrying about my debts.",
        "Rent went up and I don't know how I'll manage.",
        "I lie awake thinking about money.",
    ], ["I'm too embarrassed to tell anyone.", "I avoid opening my bills.", "I feel like I've failed."],
     ["opening one bill at a time with a cup of tea beside you", "writing a simple list of what comes in and goes out",
      "contacting a free debt advice service"]),
    "caring for a parent": ("weighed down", [
        "I look after my mum and I have no time for myself.",
        "Caring for my dad is exhausting and I feel guilty for saying so.",
        "I feel trapped since I became a carer.",
    ], ["My siblings don't help.", "I had to cut my work hours.", "I'm scared of what's coming."],
     ["asking about respite care in your area", "sharing one specific task with a sibling",
      "keeping one hour a week that is only yours"]),
    "low self-esteem": ("not good enough", [
        "I always feel worse than everyone else.",
        "I hate how I look in photos.",
        "I never think anything I do is good enough.",
    ], ["I compare myself with people online.", "I can't accept compliments.", "My inner voice is very harsh."],
     ["talking to yourself the way you would talk to a good friend", "noticing one thing you handled well today",
      "taking a break from the accounts that make you feel worse"]),
}

OPEN_REFLECT = ["It sounds like you are feeling {f}.", "I can hear how {f} you are feeling.",
                "That sounds really hard, and it makes sense to feel {f}."]
VALIDATE = ["Anyone carrying {t} would find it difficult.", "Feeling this way when facing {t} is very human.",
            "You are not alone in struggling with {t}."]
FOLLOW_REFLECT = ["Thank you for telling me more.", "That helps me understand.", "I appreciate you sharing that."]
IDEA = ["One small step might be {i}.", "Something that sometimes helps is {i}.", "You could try {i}."]
QUESTION = ["What feels hardest about it right now?", "How have you been coping so far?",
            "What would feel like a small relief this week?", "Who in your life could you lean on a little?",
            "How does that idea sound to you?"]
CLOSE_USER = ["Thank you, that helps a bit.", "I think I can try that.", "It's good to talk about it."]
CLOSE_REPLY = ["I'm glad talking has helped a little. Be gentle with yourself this week. What is one kind thing you can do for yourself today?",
               "That is a brave first step. Small steps count. When would be a good moment to try it?",
               "I'm really glad you reached out. You deserve support. How are you feeling now, compared with when we started?"]

ZH = [
    {"conversation": [
        {"system": SYSTEM, "input": "最近工作压力很大，我每天都很焦虑。", "output": "听起来你最近真的很焦虑，压力这么大，有这样的感受很正常。一个小方法是每天留出十分钟慢慢呼吸。你觉得压力最大的是哪一部分？"},
        {"input": "主要是老板总是临时加任务。", "output": "谢谢你告诉我更多。临时加任务确实让人措手不及。你可以试着和老板说明哪个截止日期有风险。这个想法你觉得怎么样？"}]},
    {"conversation": [
        {"system": SYSTEM, "input": "我搬到新城市后一个朋友都没有，很孤单。", "output": "我能感受到你的孤单。刚到一个新地方，这种感觉很常见。也许可以参加一个定期见面的小组，比如兴趣班。你平时喜欢做些什么？"},
        {"input": "我喜欢画画。", "output": "画画是很好的爱好。附近也许有绘画班，那里很容易认识志同道合的人。这周你愿意去了解一下吗？"}]},
    {"conversation": [
        {"system": SYSTEM, "input": "我晚上总是睡不着，脑子停不下来。", "output": "听起来你真的很疲惫。晚上思绪停不下来，是很多人都会经历的。可以试试睡前半小时不看手机。你睡前通常会想些什么？"},
        {"input": "总是担心第二天的事情。", "output": "谢谢你的分享。在床边放一个本子，把担心的事写下来，可以帮助大脑放下它们。你愿意今晚试一试吗？"}]},
    {"conversation": [
        {"system": SYSTEM, "input": "我的奶奶上个月去世了，我很难接受。", "output": "我很遗憾你失去了奶奶。感到深深的悲伤是很自然的。每天留一点时间怀念她，也许会有帮助。你最想念她的哪一点？"}]},
    {"conversation": [
        {"system": SYSTEM, "input": "考试快到了，我完全无法集中注意力。", "output": "听起来你现在压力很大。面对考试有这样的感受很正常。可以试着把复习分成二十五分钟一段，中间休息一下。现在最让你担心的是哪一科？"}]},
]


def reply(rng, topic, feeling, first):
    parts = []
    if first:
        parts.append(rng.choice(OPEN_REFLECT).format(f=feeling))
        parts.append(rng.choice(VALIDATE).format(t=topic))
    else:
        parts.append(rng.choice(FOLLOW_REFLECT))
    parts.append(rng.choice(IDEA).format(i=rng.choice(TOPICS[topic][3])))
    parts.append(rng.choice(QUESTION))
    return " ".join(parts)


def conversation(rng, topic, turns):
    feeling, openers, details, _ = TOPICS[topic]
    conv = [{"system": SYSTEM, "input": rng.choice(openers), "output": reply(rng, topic, feeling, True)}]
    for d in rng.sample(details, k=min(turns - 1, len(details))):
        conv.append({"input": d, "output": reply(rng, topic, feeling, False)})
    if turns >= 3 and rng.random() < 0.5:
        conv.append({"input": rng.choice(CLOSE_USER), "output": rng.choice(CLOSE_REPLY)})
    return {"conversation": conv}


def main():
    rng = random.Random(20261127)
    root = Path(__file__).resolve().parent.parent / "data"
    train, held = [], []
    for topic in TOPICS:
        for _ in range(7):
            train.append(conversation(rng, topic, rng.choice([1, 2, 2, 3, 3])))
    train += ZH
    rng.shuffle(train)
    # held-out: new first messages, not seen in training, answered turn by turn by infer
    held_msgs = [
        ("I have a job interview tomorrow and my stomach is in knots.", "What if I freeze and forget everything?"),
        ("My best friend stopped talking to me and I don't know why.", "I keep checking my phone for a message."),
        ("I feel so tired of pretending everything is fine.", "Nobody at home knows how I really feel."),
        ("I moved out of my parents' house and I miss them a lot.", None),
        ("I can't stop comparing myself to my classmates.", "They all seem to have their lives together."),
        ("I made a big mistake at work today.", None),
        ("My exams went badly and I feel like a failure.", "My parents will be so disappointed."),
        ("I've been feeling nervous all the time lately.", None),
    ]
    for a, b in held_msgs:
        conv = [{"system": SYSTEM, "input": a, "output": ""}]
        if b:
            conv.append({"input": b, "output": ""})
        held.append({"conversation": conv})
    (root / "counsel_train.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in train), encoding="utf-8")
    (root / "counsel_heldout.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in held), encoding="utf-8")
    # the study's questions, with reference replies (a separate generator: the files above stay
    # as they were). First the article's two-turn question, then new openers of some topics.
    srng = random.Random(20261201)
    study = [{"conversation": [
        {"system": SYSTEM, "input": "I'm anxious about a show I agreed to perform in next week.",
         "output": "It sounds like you are feeling anxious. Feeling this way before a performance is very human. "
                   "One small step might be rehearsing the first minute until it feels automatic. "
                   "What part of the show worries you most?"},
        {"input": "But I have social anxiety, what can I do?",
         "output": "Thank you for telling me more. You could try practising in front of one person you trust "
                   "before the show. How have you been coping so far?"}]}]
    study_msgs = [
        ("social anxiety", "I get nervous every time I have to speak up in a meeting."),
        ("trouble sleeping", "I've been sleeping four hours a night for weeks."),
        ("loneliness", "Since my friends moved away I spend every evening alone."),
        ("exam stress", "I have three exams in two days and I'm panicking."),
        ("burnout at work", "I feel numb at work, like nothing I do matters."),
    ]
    for topic, opener in study_msgs:
        feeling, _, details, _ = TOPICS[topic]
        study.append({"conversation": [
            {"system": SYSTEM, "input": opener, "output": reply(srng, topic, feeling, True)},
            {"input": srng.choice(details), "output": reply(srng, topic, feeling, False)}]})
    (root / "counsel_study.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in study), encoding="utf-8")
    turns = sum(len(c["conversation"]) for c in train)
    print(f"wrote {len(train)} training conversations ({turns} turns) {len(held)} held-out conversations and {len(study)} study questions to {root}")


if __name__ == "__main__":
    main()
