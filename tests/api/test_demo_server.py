"""`tpaserve` with no --model serves the bundled demo T6 as "t6-demo": the quickstart's
`make serve`, checked through a real server and the official openai client."""
import re


def test_demo_model_is_served_under_its_name(demo_server):
    models = demo_server.client().models.list()
    assert [m.id for m in models.data] == ["t6-demo"]


def test_demo_model_answers_with_english(demo_server):
    client = demo_server.client()
    out = client.completions.create(model="t6-demo", prompt="It is a truth universally acknowledged",
                                    max_tokens=24, temperature=0)
    text = out.choices[0].text
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 8, text
    assert text.isprintable() or "\n" in text
    again = client.completions.create(model="t6-demo", prompt="It is a truth universally acknowledged",
                                      max_tokens=24, temperature=0)
    assert again.choices[0].text == text                       # greedy is deterministic
    chat = client.chat.completions.create(model="t6-demo", max_tokens=16, temperature=0,
                                          messages=[{"role": "user", "content": "Who is Elizabeth?"}])
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
