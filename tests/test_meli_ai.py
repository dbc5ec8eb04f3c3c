"""The seller's AI agent (n8n) on Mercado Livre questions: suggested and automatic answers,
with the agent in control in Chatwoot. Mercado Livre, Chatwoot and n8n are stand-ins on
loopback HTTP; time is the injected clock."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import requests

import config
import meli_ai
import meli_jobs
import outbox
from standins import n8n as standin_n8n
from tests.meli_support import QUESTIONS_INBOX, Bridge, messages_of

AI_KEY = "ml-ai-standin-key"
ITEM = "MLB3737188005"


class AiBridge(Bridge):
    """A bridge B install with the questions workflow on an n8n stand-in (`.n8n`)."""

    def __init__(self, make_settings, serve, clock, mode="automatico", n8n_mode="sync", **env):
        self.n8n = serve(standin_n8n.create_app(api_key=AI_KEY, mode=n8n_mode))
        env = {"ML_AI_MODE": mode, "ML_AI_WEBHOOK_URL": f"{self.n8n.url}/webhook/ml-perguntas",
               "ML_AI_API_KEY": AI_KEY, **env}
        super().__init__(make_settings, serve, clock, **env)
        self.n8n_set(ponte_url=self.web.url)

    def n8n_set(self, **body):
        requests.post(f"{self.n8n.url}/_standin/mode", json=body, timeout=5).raise_for_status()

    def n8n_calls(self) -> list[dict]:
        return requests.get(f"{self.n8n.url}/_standin/calls", timeout=5).json()["calls"]

    def conversation(self) -> dict:
        (conv,) = self.conversations(QUESTIONS_INBOX)
        return conv

    def notes(self) -> list[str]:
        return [m["content"] for m in messages_of(self.conversation()) if m["private"]]

    def answers(self) -> list[str]:
        return [a["text"] for a in self.ml_state()["answers"]]

    def seed_item(self, **extra):
        self.ml_post("/_standin/items", [{
            "id": ITEM, "title": "Espaçador E Nivelador Para Piso 1,5 Mm 500pçs",
            "price": 62.96, "available_quantity": 37,
            "attributes": [{"id": "BRAND", "name": "Marca", "value_name": "Cortag"},
                           {"id": "MATERIAL", "name": "Material", "value_name": "Plástico"}],
            "description_text": "Kit com 500 espaçadores de 1,5 mm.\nIdeal para porcelanato.",
            **extra}])

    def ask_ai(self, text: str, **kw) -> int:
        """A buyer asks about the seeded item (its details kept)."""
        return self.ml_post("/_standin/questions", [{"text": text, "item_id": ITEM,
                                                     "buyer_id": 1944693439, **kw}])["ids"][0]


@pytest.fixture
def make_ai(make_settings, serve, clock):
    made = []

    def build(**kw) -> AiBridge:
        b = AiBridge(make_settings, serve, clock, **kw)
        b.seed_item()
        made.append(b)
        return b

    yield build
    for b in made:
        b.poller.conn.close()
        b.conn.close()


def _script(b: AiBridge, *bodies):
    b.n8n_set(script=list(bodies))


# --- settings -------------------------------------------------------------------------------------

def test_ai_settings_never_make_the_whatsapp_bridge_half_configured():
    env = {"ML_AI_MODE": "sugerir", "ML_AI_WEBHOOK_URL": "http://127.0.0.1:9/webhook/x",
           "ML_AI_API_KEY": "k" * 20, "ML_AI_HOURS": "18:00-08:00"}
    s = config.load_settings(env)
    assert s.enabled_bridges == () and s.ml_ai_mode == "sugerir"
    assert "k" * 20 not in repr(s)  # the key is a secret


@pytest.mark.parametrize("env, problem", [
    ({"ML_AI_MODE": "automatico"}, "ML_AI_MODE=automatico exige: ML_AI_WEBHOOK_URL, ML_AI_API_KEY"),
    ({"ML_AI_HOURS": "18h-8h"}, "ML_AI_HOURS inválido"),
    ({"ML_AI_HOURS": "25:00-08:00"}, "ML_AI_HOURS inválido"),
    ({"ML_AI_TIMEZONE": "America/Atlantida"}, "ML_AI_TIMEZONE inválido"),
    ({"ML_AI_MODE": "sempre"}, "ML_AI_MODE inválido"),
])
def test_ai_settings_are_checked_at_start(env, problem):
    with pytest.raises(config.ConfigError) as err:
        config.load_settings(env)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_hours_choose_automatic_inside_and_suggestion_outside():
    s = config.load_settings({"ML_AI_MODE": "automatico", "ML_AI_WEBHOOK_URL": "http://x.io/w",
                              "ML_AI_API_KEY": "k", "ML_AI_HOURS": "18:00-08:00"})

    def at(hour: int, minute: int = 0) -> float:  # São Paulo is UTC-3
        return datetime(2026, 3, 10, (hour + 3) % 24, minute, tzinfo=timezone.utc).timestamp() \
            + (86400 if hour + 3 >= 24 else 0)

    assert meli_ai.effective_mode(s, at(22)) == "automatico"
    assert meli_ai.effective_mode(s, at(3)) == "automatico"
    assert meli_ai.effective_mode(s, at(7, 59)) == "automatico"
    assert meli_ai.effective_mode(s, at(8)) == "sugerir"
    assert meli_ai.effective_mode(s, at(14)) == "sugerir"
    assert meli_ai.effective_mode(s.replace(ml_ai_hours=""), at(14)) == "automatico"
    assert meli_ai.effective_mode(s.replace(ml_ai_mode="sugerir"), at(22)) == "sugerir"


@pytest.mark.parametrize("text, reasons", [
    ("Chama no zap (11) 98765-4321 que te passo o desconto", ["phone"]),
    ("Liga 11987654321", ["phone"]),
    ("Fala com a gente: 98765-4321", ["phone"]),
    ("Manda um e-mail para vendas@loja.com.br", ["email", "link"]),
    ("Veja o vídeo em https://youtu.be/abc", ["link"]),
    ("Mais fotos em www.minhaloja.com", ["link"]),
    ("Retire na Rua das Flores, 123 - Centro", ["address"]),
    ("Nosso CEP é 01310-100", ["address"]),
    ("a" * 2001, ["too_long"]),
])
def test_contact_data_and_length_hold_an_answer(text, reasons):
    assert [r for r, _ in meli_ai.held_reasons(text)] == reasons


@pytest.mark.parametrize("text", [
    "Sim! Serve nos modelos 2019 2020 2021 e o kit tem 500 peças de 1,5 mm.",
    "Custa R$ 1.234,50 à vista ou 10x de R$ 123,45.",
    "Temos 37 unidades; enviamos em 24 horas pelo Mercado Envios.",
    "Medidas: 120 x 60 x 45 cm, peso 12,5 kg. Voltagem 110/220 V.",
    "Sim, na rua ou em casa funciona igual.",
])
def test_ordinary_answers_are_not_held(text):
    assert meli_ai.held_reasons(text) == []


# --- asking the workflow --------------------------------------------------------------------------

def test_the_workflow_gets_question_item_history_and_site_and_never_a_token(make_ai):
    b = make_ai(mode="sugerir")
    # GIVEN the buyer asked on this item before, and it was answered
    earlier = b.ask_ai("Qual a marca?", status="ANSWERED", date_created="2026-03-01T10:00:00.000-03:00",
                       answer={"text": "Cortag.", "status": "ACTIVE",
                               "date_created": "2026-03-01T11:00:00.000-03:00"})
    b.ml_post("/_standin/questions", [{"text": "Outro comprador", "item_id": ITEM,
                                       "buyer_id": 55, "status": "ANSWERED"}])
    qid = b.ask_ai("Tem em estoque?")
    # WHEN the question is imported
    b.poll()
    # THEN the workflow was called once with the question, the item, the history and the site
    (call,) = b.n8n_calls()
    body = call["body"]
    assert call["path"] == "ml-perguntas" and call["idempotency_key"] == f"ml-ai:{qid}"
    assert body["chat_type"] == "mercadolivre_question" and body["site_id"] == "MLB"
    assert body["question"]["id"] == qid and body["question"]["text"] == "Tem em estoque?"
    assert body["message_text"] == "Tem em estoque?"
    assert body["conversation_id"] == str(b.conversation()["id"])
    item = body["item"]
    assert item["id"] == ITEM and item["title"].startswith("Espaçador") and item["price"] == 62.96
    assert item["available_quantity"] == 37
    assert item["permalink"] == f"https://produto.mercadolivre.com.br/{ITEM}"
    assert {"id": "BRAND", "name": "Marca", "value": "Cortag"} in item["attributes"]
    assert item["description"].startswith("Kit com 500 espaçadores")
    assert [(q["id"], q["answer"]["text"]) for q in body["previous_questions"]] == [
        (earlier, "Cortag.")]
    # AND nothing in it is a credential
    raw = json.dumps(call) + json.dumps(body)
    for secret in ("APP_USR", "TG-standin", "standin-secret", "Bearer"):
        assert secret not in raw


def test_item_details_are_cached_between_questions(make_ai):
    b = make_ai(mode="sugerir")
    b.ask_ai("Tem em estoque?")
    b.poll()
    b.ask_ai("Qual o material?", buyer_id=77)
    b.poll()
    descriptions = [c for c in b.ml_state()["calls"] if c["path"] == f"/items/{ITEM}/description"]
    assert len(descriptions) == 1
    assert len(b.n8n_calls()) == 2
    assert b.n8n_calls()[1]["body"]["item"]["description"].startswith("Kit com 500")


def test_mercado_livre_busy_makes_the_ai_wait_for_the_item_instead_of_answering_blind(make_ai,
                                                                                     clock):
    # GIVEN Mercado Livre answering 503 for the item's details once (the question is imported)
    b = make_ai(mode="automatico")
    b.ask_ai("Tem em estoque?")
    b.fail_ml(f"/items/{ITEM}", 503, count=1)
    b.poll()
    # THEN the workflow is not asked without the item's facts ...
    assert b.n8n_calls() == [] and b.answers() == []
    # ... and once Mercado Livre answers, it is asked with them
    clock.advance(60)
    b.drain()
    (call,) = b.n8n_calls()
    assert call["body"]["item"]["title"].startswith("Espaçador") and len(b.answers()) == 1


def test_ai_off_never_calls_the_workflow(make_ai):
    b = make_ai(mode="desligado")
    b.ask_ai("Tem em estoque?")
    b.poll()
    assert b.n8n_calls() == [] and b.notes() == [] and b.answers() == []


# --- sugerir ----------------------------------------------------------------------------------------

def test_suggest_mode_leaves_a_private_note_and_sends_nothing(make_ai):
    b = make_ai(mode="sugerir")
    b.ask_ai("Tem em estoque?")
    b.poll()
    assert b.answers() == []
    (note,) = b.notes()
    assert note.startswith("💡 Sugestão da IA: Olá! Sim, temos 37 unidades a pronta entrega.")
    assert "#ok" in note


def test_agent_ok_sends_the_suggestion_verbatim_and_never_the_ok(make_ai):
    b = make_ai(mode="sugerir")
    b.ask_ai("Tem em estoque?")
    b.poll()
    conv = b.conversation()
    # WHEN the agent replies exactly "#ok"
    hook = b.agent_replies(conv["id"], "#OK ")
    b.drain()
    # THEN the buyer gets the suggestion as it was, once, and never "#ok"
    assert b.answers() == ["Olá! Sim, temos 37 unidades a pronta entrega. Pode comprar!"]
    assert any(n.startswith("✅ Sugestão da IA enviada") for n in b.notes())
    conv = b.conversation()
    assert "respondida" in conv["labels"] and "ia-respondeu" not in conv["labels"]
    assert [m for m in messages_of(conv) if m["id"] == hook["message_id"]][0]["status"] \
        == "delivered"
    # AND a second #ok finds nothing to send
    b.agent_replies(conv["id"], "#ok")
    b.drain()
    assert len(b.answers()) == 1


def test_ok_run_again_after_a_crash_is_not_refused(make_ai):
    import meli_questions

    b = make_ai(mode="sugerir")
    qid = b.ask_ai("Tem em estoque?")
    b.poll()
    b.agent_replies(b.conversation()["id"], "#ok")
    b.drain()
    (job,) = b.jobs(kind="chatwoot.forward_reply")
    # WHEN the same reply runs again (its completion was lost in a crash)
    result, _ = meli_questions.answer_question(b.ctx, None, job["payload"], str(qid))
    # THEN it is the same answer, not "no suggestion": nothing is sent twice, no false note
    assert result["status"] == "answered"
    assert len(b.answers()) == 1


def test_ok_without_a_suggestion_is_refused_with_a_note(make_ai):
    b = make_ai(mode="sugerir", n8n_mode="empty")  # the workflow has not answered yet
    b.ask_ai("Tem em estoque?")
    b.poll()
    hook = b.agent_replies(b.conversation()["id"], "#ok")
    b.drain()
    assert b.answers() == []
    assert any("não tem sugestão pendente" in n for n in b.notes())
    assert [m for m in messages_of(b.conversation()) if m["id"] == hook["message_id"]][0][
        "status"] == "failed"


def test_any_other_reply_is_sent_as_the_agent_wrote_it(make_ai):
    b = make_ai(mode="sugerir")
    b.ask_ai("Tem em estoque?")
    b.poll()
    b.agent_replies(b.conversation()["id"], "Temos 2 unidades, ok?")
    b.drain()
    assert b.answers() == ["Temos 2 unidades, ok?"]


# --- automatico -------------------------------------------------------------------------------------

def test_automatic_mode_answers_once_on_mercado_livre_and_shows_it_labelled(make_ai):
    b = make_ai(mode="automatico", CHATWOOT_RESOLVE_ANSWERED="true")
    qid = b.ask_ai("Tem em estoque?")
    b.poll()
    text = "Olá! Sim, temos 37 unidades a pronta entrega. Pode comprar!"
    assert b.answers() == [text]
    assert b.ml_state()["questions"][str(qid)]["status"] == "ANSWERED"
    conv = b.conversation()
    (shown,) = [m for m in messages_of(conv) if m["message_type_name"] == "outgoing"
                and not m["private"]]
    assert shown["content"] == text and shown["status"] == "delivered"
    assert {"ia-respondeu", "respondida"} <= set(conv["labels"])
    assert conv["status"] == "resolved"  # CHATWOOT_RESOLVE_ANSWERED
    # WHEN Chatwoot echoes ponte's own message back, and ponte restarts and polls again
    b.echo_of(shown["id"])
    b.restart()
    b.poll()
    # THEN nothing more is sent: one answer, one workflow call
    assert b.answers() == [text] and len(b.n8n_calls()) == 1
    assert b.jobs(kind="chatwoot.forward_reply") == []
    b.assert_spec_clean()


def test_automatic_answer_keeps_the_conversation_open_without_the_resolve_setting(make_ai):
    b = make_ai(mode="automatico")
    b.ask_ai("Tem em estoque?")
    b.poll()
    assert len(b.answers()) == 1 and b.conversation()["status"] == "open"


@pytest.mark.parametrize("answer, why", [
    ("Me chama no WhatsApp (11) 98765-4321!", "contém um telefone"),
    ("Escreva para vendas@exemplo.com.br", "contém um e-mail"),
    ("Veja em https://minhaloja.com.br/kit", "contém um link"),
    ("Pode retirar na Rua Augusta, 1500", "contém um endereço"),
    ("Sim. " + "muito bom " * 220, "tem 2204 caracteres"),  # trailing space trimmed
])
def test_contact_data_or_length_is_never_auto_sent_and_waits_as_a_suggestion(make_ai, answer,
                                                                                why):
    b = make_ai(mode="automatico")
    _script(b, {"output": answer})
    b.ask_ai("Tem em estoque?")
    b.poll()
    assert b.answers() == []
    (note,) = b.notes()
    assert note.startswith("💡 Sugestão da IA: " + answer.strip()[:30])
    assert why in note
    assert "ia-respondeu" not in b.conversation()["labels"]


def test_held_suggestion_goes_out_when_the_agent_says_ok(make_ai):
    b = make_ai(mode="automatico")
    _script(b, {"output": "Modelo 2020, código 11 9876 5432 no manual."})
    b.ask_ai("Qual o código?")
    b.poll()
    assert b.answers() == []
    b.agent_replies(b.conversation()["id"], "#ok")
    b.drain()
    assert b.answers() == ["Modelo 2020, código 11 9876 5432 no manual."]


@pytest.mark.parametrize("hours, sent", [("18:00-08:00", False), ("08:00-18:00", True)])
def test_outside_the_hours_automatic_mode_only_suggests(make_ai, hours, sent):
    # the clock's 1_790_000_000 is 2026-09-21 11:13 in São Paulo
    b = make_ai(mode="automatico", ML_AI_HOURS=hours)
    b.ask_ai("Tem em estoque?")
    b.poll()
    assert len(b.answers()) == (1 if sent else 0)
    assert bool(b.notes()) is not sent
    if not sent:
        assert b.notes()[0].startswith("💡 Sugestão da IA:")


def test_automatic_answer_refused_by_mercado_livre_becomes_a_note(make_ai):
    b = make_ai(mode="automatico")
    qid = b.ask_ai("Tem em estoque?")
    meli_jobs.poll_questions(b.ctx)
    b.poller.drain(max_jobs=2)  # imported, and the workflow answered
    # WHEN the buyer deletes the question before the answer goes out
    b.ml_post(f"/_standin/questions/{qid}", {"status": "DELETED"})
    b.drain()
    # THEN nothing is posted, and the AI's message says why, as an agent's would
    assert b.answers() == []
    assert any("excluída" in n for n in b.notes())
    shown = [m for m in messages_of(b.conversation()) if m["source_id"] == f"meli:ai-answer:{qid}"]
    assert shown[0]["status"] == "failed"


def test_should_send_false_sends_nothing(make_ai):
    b = make_ai(mode="automatico")
    _script(b, {"output": "Não sei responder.", "should_send": False})
    b.ask_ai("Tem em estoque?")
    b.poll()
    assert b.answers() == [] and b.notes() == []


# --- failures and the agent in control ---------------------------------------------------------

def test_n8n_down_leaves_the_question_to_the_agents_with_a_note(make_ai, clock):
    b = make_ai(mode="automatico", n8n_mode="down")
    b.ask_ai("Tem em estoque?")
    b.poll()
    for _ in range(meli_ai.AI_ATTEMPTS):
        clock.advance(60)
        b.drain()
    assert len(b.n8n_calls()) == meli_ai.AI_ATTEMPTS
    assert b.answers() == []
    (note,) = b.notes()
    assert "agente de IA (n8n) não respondeu" in note and "HTTP 503" in note
    # AND the operator hears of it: the job is dead and the n8n_failing alert's condition holds
    assert b.jobs(kind="n8n.ml_question")[0]["status"] == "dead"
    import alerts
    assert "n8n_failing" in alerts.evaluate(b.conn, b.settings, clock())
    # AND the agents still answer as usual
    b.agent_replies(b.conversation()["id"], "Temos sim.")
    b.drain()
    assert b.answers() == ["Temos sim."]


def test_n8n_unreachable_is_told_in_words(make_ai, clock):
    b = make_ai(mode="sugerir", ML_AI_WEBHOOK_URL="http://127.0.0.1:9/webhook/x",
                ML_AI_TIMEOUT_SECONDS="2")
    b.ask_ai("Tem em estoque?")
    b.poll()
    for _ in range(meli_ai.AI_ATTEMPTS):
        clock.advance(60)
        b.drain()
    (note,) = b.notes()
    assert "(sem conexão ou tempo esgotado)" in note


def test_the_agents_reply_wins_over_a_slower_ai(make_ai):
    b = make_ai(mode="automatico")
    b.ask_ai("Tem em estoque?")
    meli_jobs.poll_questions(b.ctx)
    b.poller.drain(max_jobs=1)  # imported; the AI has not answered yet
    # WHEN the agent replies while the AI is thinking
    b.agent_replies(b.conversation()["id"], "Temos sim, 3 unidades.")
    b.drain()
    # THEN only the agent's answer goes out; the AI's is dropped without a word
    assert b.answers() == ["Temos sim, 3 unidades."]
    assert b.notes() == []
    assert "ia-respondeu" not in b.conversation()["labels"]


def test_a_slow_ai_never_holds_up_the_agents_reply(make_ai):
    import threading

    from standins.support import wait_for

    # GIVEN a question imported, and an AI that takes 5 s to answer
    b = make_ai(mode="automatico")
    qid = b.ask_ai("Tem em estoque?")
    meli_jobs.poll_questions(b.ctx)
    b.poller.drain(max_jobs=1)
    b.n8n_set(delay=5.0)
    worker = threading.Thread(target=b.drain, daemon=True)
    worker.start()
    wait_for(lambda: b.n8n_calls(), timeout=5, interval=0.02, what="the AI at work")
    # WHEN the agent replies while the AI is still thinking
    b.agent_replies(b.conversation()["id"], "Temos sim, 3 unidades.")
    # THEN the agent's answer reaches Mercado Livre while the AI's call is still running
    wait_for(lambda: b.answers(), timeout=4.5, interval=0.02, what="the agent's answer")
    assert outbox.get_job(b.conn, dedupe_key=f"ml-ai:{qid}")["status"] == "running"
    worker.join(20)
    assert not worker.is_alive()
    # AND the AI's answer, when it comes, is dropped
    assert b.answers() == ["Temos sim, 3 unidades."] and b.notes() == []


def test_an_agent_reply_refused_still_keeps_the_ai_out(make_ai):
    b = make_ai(mode="automatico", n8n_mode="empty")
    qid = b.ask_ai("Tem em estoque?")
    b.poll()
    b.agent_replies(b.conversation()["id"], "x" * 2001)  # refused: too long
    b.drain()
    answer = requests.post(f"{b.web.url}/mercadolivre/send-response",
                           headers={"Authorization": f"Bearer {AI_KEY}"},
                           json={"question_id": qid, "response_text": "Temos sim!"}, timeout=5)
    assert answer.status_code == 202
    b.drain()
    assert b.answers() == []


# --- the asynchronous route -------------------------------------------------------------------------

def _post_async(b, body, key=AI_KEY):
    return requests.post(f"{b.web.url}/mercadolivre/send-response", json=body, timeout=5,
                         headers={"Authorization": f"Bearer {key}"})


def test_async_answer_is_published_once_and_a_late_one_after_the_agent_is_dropped(make_ai):
    b = make_ai(mode="automatico", n8n_mode="empty")
    first = b.ask_ai("Tem em estoque?")
    b.poll()
    assert b.answers() == [] and b.notes() == []  # the workflow will answer later
    # WHEN the workflow posts its answer later (by correlation id), twice
    body = {"bridge_correlation_id": f"ml-question:{first}", "output": "Temos sim!"}
    answer = _post_async(b, body)
    assert answer.status_code == 202 and answer.json()["queued"] is True
    assert _post_async(b, body).json()["duplicate"] is True
    b.drain()
    assert b.answers() == ["Temos sim!"]
    # AND on another question the agent answers first: the late AI answer is dropped
    second = b.ask_ai("Qual o material?", buyer_id=77)
    b.poll()
    conv = [c for c in b.conversations(QUESTIONS_INBOX)
            if c["custom_attributes"]["meli_question_id"] == str(second)][0]
    b.agent_replies(conv["id"], "Plástico.")
    b.drain()
    assert _post_async(b, {"question_id": second, "response_text": "É de plástico."}
                       ).status_code == 202
    b.drain()
    assert b.answers() == ["Temos sim!", "Plástico."]


def test_async_route_checks_key_body_and_question(make_ai):
    b = make_ai(mode="sugerir", n8n_mode="empty")
    qid = b.ask_ai("Tem em estoque?")
    b.poll()
    assert _post_async(b, {"question_id": qid, "output": "x"}, key="wrong").status_code == 401
    assert _post_async(b, {"question_id": qid}).status_code == 400
    assert _post_async(b, {"output": "x"}).status_code == 400
    assert _post_async(b, {"question_id": 999, "output": "x"}).status_code == 404
    assert _post_async(b, {"question_id": "１２", "output": "x"}).status_code == 400  # ASCII only
    declined = _post_async(b, {"question_id": qid, "should_send": False})
    assert declined.status_code == 202 and declined.json()["queued"] is False
    assert _post_async(b, {"question_id": qid, "output": "Sim!"}).status_code == 202
    b.drain()
    assert b.notes()[0].startswith("💡 Sugestão da IA: Sim!")


def test_async_route_refuses_answers_while_the_ai_is_off(make_ai):
    b = make_ai(mode="desligado", ML_AI_API_KEY=AI_KEY)
    qid = b.ask_ai("Tem em estoque?")
    b.poll()
    assert _post_async(b, {"question_id": qid, "output": "Sim!"}).status_code == 409


def test_prune_keeps_what_an_open_question_needs(make_ai, clock):
    import meli_ai_store
    import meli_store

    b = make_ai(mode="automatico", n8n_mode="empty")
    qid = b.ask_ai("Tem em estoque?")
    b.poll()
    b.agent_replies(b.conversation()["id"], "x" * 2001)  # refused, but the agent replied
    b.drain()
    # WHEN retention passes while the question is still open
    clock.advance(30 * 86400)
    assert meli_ai_store.prune in meli_jobs.PRUNE
    meli_ai_store.prune(b.conn, clock() - 7 * 86400)
    # THEN the item cache goes, the agent's mark stays
    assert meli_ai_store.get_item(b.conn, ITEM) is None
    assert meli_ai_store.get(b.conn, qid).agent_replied_at is not None
    # AND once meli_store prunes the settled question, its AI row goes too
    b.conn.execute("DELETE FROM ml_questions WHERE ml_question_id = ?", (str(qid),))
    meli_ai_store.prune(b.conn, clock() - 7 * 86400)
    assert meli_ai_store.get(b.conn, qid) is None
    assert meli_store.get_question(b.conn, qid) is None


def test_ai_mode_without_the_mercado_livre_bridge_is_a_warning():
    s = config.load_settings({"ML_AI_MODE": "sugerir", "ML_AI_WEBHOOK_URL": "http://x.io/w",
                              "ML_AI_API_KEY": "k"})
    assert any(w.startswith("ML_AI_MODE=sugerir sem a ponte 'mercadolivre'")
               for w in config.warnings(s))
    assert not any("ML_AI" in w for w in config.warnings(s.replace(ml_ai_mode="desligado")))
