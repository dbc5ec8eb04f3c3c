"""Settings of ponte: every setting declared once, read once from the environment.

Owns: the `SETTINGS` declarations (name, default, unit, help), `load_settings()` that builds one
frozen `Settings`, the rules that enable each bridge, and the masking of secrets.
Must not: import any other module of ponte, touch the network or the database.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

VERSION = "0.2.0"
APP_NAME = "ponte"

# Values users copy from the seed README and forget to change; they count as missing.
_PLACEHOLDER_PATTERN = re.compile(
    r"^(seu|sua|your|xxx+|changeme|change_me|<.*>|example|exemplo|preencha|token_aqui)", re.I
)


class ConfigError(Exception):
    """Raised with every configuration problem at once, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("configuração inválida: " + "; ".join(problems))


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, default, type, unit and help text (pt-BR)."""

    name: str
    default: Any
    kind: str  # "str" | "int" | "float" | "bool" | "url" | "choice" | "id" (digits, kept as text)
    help: str
    unit: str = ""
    secret: bool = False
    group: str = "geral"
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # numbers: the smallest accepted value
    maximum: float | None = None  # numbers: the largest accepted value

    @property
    def attr(self) -> str:
        return self.name.lower()


def _s(name, default, kind, help, **kw) -> Setting:
    return Setting(name=name, default=default, kind=kind, help=help, **kw)


SETTINGS: tuple[Setting, ...] = (
    # --- service -----------------------------------------------------------------------------
    _s("HOST", "0.0.0.0", "str", "Endereço em que o servidor web escuta."),
    _s("PORT", 8000, "int", "Porta HTTP do servidor web.", unit="porta", minimum=1,
       maximum=65535),
    _s("DEBUG", False, "bool", "Modo de depuração (logs DEBUG, respostas de erro detalhadas)."),
    _s("ENVIRONMENT", "production", "choice", "Ambiente: production, development, demo ou test.",
       choices=("production", "development", "demo", "test")),
    _s("DATABASE_PATH", "data/ponte.db", "str", "Arquivo SQLite com todo o estado (use um volume)."),
    _s("LOG_DIR", "logs", "str", "Pasta dos logs diários app-AAAAMMDD.log."),
    _s("LOG_LEVEL", "INFO", "choice", "Nível de log: DEBUG, INFO, WARNING ou ERROR.",
       choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    _s("LOG_RETENTION_DAYS", 14, "int", "Quantos dias de arquivos de log manter.", unit="dias",
       minimum=1),
    _s("ADMIN_TOKEN", "", "str", "Token Bearer para /config, /bot/* e páginas de administração.",
       secret=True),
    _s("PUBLIC_BASE_URL", "", "url", "URL pública da ponte (ex.: https://ponte.seudominio.com.br)."),
    _s("WEB_WORKERS", 2, "int", "Processos Gunicorn do servidor web.", unit="processos",
       minimum=1),
    _s("MAX_BODY_BYTES", 1_048_576, "int", "Tamanho máximo do corpo de uma requisição.", unit="bytes",
       minimum=1),
    _s("JOB_LEASE_SECONDS", 120, "int", "Tempo após o qual um job em execução de um worker morto "
       "é retomado.", unit="segundos", minimum=1),
    _s("JOB_MAX_ATTEMPTS", 12, "int", "Tentativas máximas de um job antes de ir para 'dead'.",
       unit="tentativas", minimum=1),
    _s("JOB_MAX_AGE_SECONDS", 86_400, "int", "Idade máxima de um job com falhas antes de ir para "
       "'dead'.", unit="segundos", minimum=1),
    _s("JOB_RETENTION_DAYS", 7, "int", "Dias que jobs concluídos, webhooks recebidos, mensagens "
       "de clientes e dados de vida curta ficam guardados.", unit="dias", minimum=1),
    _s("POLLER_CONCURRENCY", 32, "int", "Jobs executados ao mesmo tempo pelo poller (uma "
       "conversa nunca tem dois jobs em execução).", unit="jobs", minimum=1),
    _s("POLLER_LANE_LIMITS", "", "str", "Limite de jobs simultâneos por parceiro, ex.: "
       "n8n=24,kommo=8 (padrão: 3/4 de POLLER_CONCURRENCY para cada parceiro).", group="geral"),
    _s("RETRY_AFTER_MAX_SECONDS", 900, "int", "Espera máxima pedida por um parceiro (Retry-After) "
       "antes de tentar de novo; cada espera conta nas tentativas.", unit="segundos", minimum=1),
    _s("POLLER_HEARTBEAT_MAX_AGE_SECONDS", 30, "int", "Idade máxima do heartbeat do poller para "
       "/health responder 200.", unit="segundos", minimum=1),
    _s("ALERT_WEBHOOK_URL", "", "url", "Recebe os alertas (POST JSON com alert, status "
       "firing/resolved, message, since, details), ex.: um Webhook do n8n que avisa no WhatsApp "
       "ou e-mail (vazio = alertas só no painel e no /health).", secret=True),
    _s("ALERT_CHECK_SECONDS", 30, "int", "Intervalo em que o poller confere as condições de "
       "alerta.", unit="segundos", minimum=5, maximum=120),
    _s("ALERT_JOBS_OVERDUE_SECONDS", 600, "int", "Alerta quando um job vencido espera mais que "
       "isto para rodar.", unit="segundos", minimum=60),
    _s("METRICS_TOKEN", "", "str", "Token Bearer exigido em /metrics (vazio = /metrics aberto).",
       secret=True),
    # --- bridge A: Kommo / n8n ---------------------------------------------------------------
    _s("KOMMO_BASE_URL", "", "url", "URL da sua conta Kommo (https://SUBDOMINIO.kommo.com).",
       group="kommo"),
    _s("KOMMO_ACCESS_TOKEN", "", "str", "Token de longa duração da integração privada.",
       secret=True, group="kommo"),
    _s("KOMMO_CLIENT_ID", "", "str", "ID da integração (OAuth).", group="kommo"),
    _s("KOMMO_CLIENT_SECRET", "", "str", "Chave secreta da integração (OAuth).", secret=True,
       group="kommo"),
    _s("KOMMO_REDIRECT_URI", "", "url", "URL de redirecionamento OAuth "
       "(PUBLIC_BASE_URL/oauth/callback).", group="kommo"),
    _s("KOMMO_ACCOUNT_ID", "", "id", "ID da conta Kommo; webhooks de outra conta são recusados.",
       group="kommo"),
    _s("KOMMO_WEBHOOK_SECRET", "", "str", "Segredo longo e aleatório na URL do webhook do Kommo.",
       secret=True, group="kommo"),
    _s("KOMMO_REPLY_MODE", "talk", "choice", "Como a resposta volta ao WhatsApp: talk (Chats API) "
       "ou salesbot.", choices=("talk", "salesbot"), group="kommo"),
    _s("KOMMO_SALESBOT_ID", "", "id", "ID do Salesbot que envia {{lead.cf.CAMPO}} (modo salesbot).",
       group="kommo"),
    _s("KOMMO_REPLY_FIELD_ID", "", "id", "ID do campo de texto do lead que recebe a resposta "
       "(modo salesbot).", group="kommo"),
    _s("KOMMO_MAX_RPS", 7.0, "float", "Máximo de requisições ao Kommo em qualquer janela de um "
       "segundo, somando todos os processos (o Kommo bloqueia acima de 7).", unit="req/s",
       group="kommo"),
    _s("N8N_WEBHOOK_URL", "", "url", "URL do Webhook do seu fluxo n8n.", group="kommo"),
    _s("N8N_API_KEY", "", "str", "Chave compartilhada com o n8n (Bearer nos dois sentidos).",
       secret=True, group="kommo"),
    _s("N8N_TIMEOUT_SECONDS", 60.0, "float", "Tempo máximo de espera pela resposta do n8n.",
       unit="segundos", group="kommo", minimum=1),
    _s("BOT_DEBOUNCE_SECONDS", 3.0, "float", "Junta mensagens seguidas do cliente nesta janela "
       "(0 desliga).", unit="segundos", group="kommo", minimum=0),
    _s("BOT_DEBOUNCE_MAX_SECONDS", 15.0, "float", "Janela máxima de agrupamento de mensagens.",
       unit="segundos", group="kommo", minimum=0),
    _s("BOT_AUTO_RESUME_HOURS", 0.0, "float", "Reativa o bot sozinho após N horas pausado "
       "(0 = nunca).", unit="horas", group="kommo", minimum=0),
    _s("BOT_PAUSE_ON_HUMAN_REPLY", False, "bool", "Pausa o bot quando um usuário do Kommo escreve "
       "no chat.", group="kommo"),
    _s("BOT_FALLBACK_MESSAGE", "", "str", "Texto enviado uma vez ao cliente quando o assistente "
       "não responde (vazio = não envia).", group="kommo"),
    # --- bridge B: Mercado Livre / Chatwoot ---------------------------------------------------
    _s("ML_CLIENT_ID", "", "id", "App ID do aplicativo no Mercado Livre.", group="mercadolivre"),
    _s("ML_CLIENT_SECRET", "", "str", "Secret Key do aplicativo no Mercado Livre.", secret=True,
       group="mercadolivre"),
    _s("ML_REDIRECT_URI", "", "url", "URI de redirecionamento "
       "(PUBLIC_BASE_URL/oauth/mercadolivre/callback).", group="mercadolivre"),
    _s("ML_SELLER_ID", "", "id", "ID do usuário vendedor no Mercado Livre.", group="mercadolivre"),
    _s("ML_SITE_ID", "MLB", "str", "Site do Mercado Livre (MLB = Brasil).", group="mercadolivre"),
    _s("ML_API_BASE_URL", "https://api.mercadolibre.com", "url", "API do Mercado Livre.",
       group="mercadolivre"),
    _s("ML_AUTH_BASE_URL", "", "url", "Página de autorização (padrão por site; MLB: "
       "https://auth.mercadolivre.com.br).", group="mercadolivre"),
    _s("ML_USE_PKCE", False, "bool", "Usa PKCE no OAuth (ative se o app exigir).",
       group="mercadolivre"),
    _s("ML_ACCESS_TOKEN", "", "str", "Access token inicial (opcional; o OAuth preenche).",
       secret=True, group="mercadolivre"),
    _s("ML_REFRESH_TOKEN", "", "str", "Refresh token inicial (opcional; o OAuth preenche).",
       secret=True, group="mercadolivre"),
    _s("ML_POLL_QUESTIONS_SECONDS", 60, "int", "Intervalo de busca de perguntas.",
       unit="segundos", group="mercadolivre", minimum=1),
    _s("ML_POLL_MESSAGES_SECONDS", 60, "int", "Intervalo de busca de mensagens pós-venda.",
       unit="segundos", group="mercadolivre", minimum=1),
    _s("ML_AI_MODE", "desligado", "choice", "Agente de IA (n8n) nas perguntas: desligado, "
       "sugerir (nota privada; o agente envia com #ok) ou automatico (responde sozinho no "
       "Mercado Livre).", choices=("desligado", "sugerir", "automatico"), group="mercadolivre"),
    _s("ML_AI_WEBHOOK_URL", "", "url", "URL do Webhook do fluxo n8n que responde perguntas "
       "(pode ser o mesmo n8n do WhatsApp, em outro fluxo).", group="mercadolivre"),
    _s("ML_AI_API_KEY", "", "str", "Chave compartilhada com o fluxo de perguntas (Bearer nos dois "
       "sentidos).", secret=True, group="mercadolivre"),
    _s("ML_AI_HOURS", "", "str", "Horário do modo automatico, ex.: 18:00-08:00; fora dele a IA só "
       "sugere (vazio = o dia todo).", group="mercadolivre"),
    _s("ML_AI_TIMEZONE", "America/Sao_Paulo", "str", "Fuso horário de ML_AI_HOURS.",
       group="mercadolivre"),
    _s("ML_AI_TIMEOUT_SECONDS", 30.0, "float", "Tempo máximo de espera pela resposta do fluxo de "
       "perguntas.", unit="segundos", group="mercadolivre"),
    _s("CHATWOOT_BASE_URL", "", "url", "URL do seu Chatwoot.", group="chatwoot"),
    _s("CHATWOOT_API_TOKEN", "", "str", "Token de acesso (Perfil → Token de acesso).", secret=True,
       group="chatwoot"),
    _s("CHATWOOT_ACCOUNT_ID", "", "id", "ID da conta no Chatwoot.", group="chatwoot"),
    _s("CHATWOOT_QUESTIONS_INBOX_ID", "", "id", "Caixa (API) das perguntas de pré-venda.",
       group="chatwoot"),
    _s("CHATWOOT_SALES_INBOX_ID", "", "id", "Caixa (API) das mensagens pós-venda.",
       group="chatwoot"),
    _s("CHATWOOT_WEBHOOK_SECRET", "", "str", "Segredo HMAC do webhook da caixa API (um por caixa, separados por "
       "vírgula).", secret=True,
       group="chatwoot"),
    _s("CHATWOOT_WEBHOOK_TOKEN", "", "str", "Token na URL do webhook (Chatwoot sem assinatura).",
       secret=True, group="chatwoot"),
    _s("CHATWOOT_RESOLVE_ANSWERED", False, "bool", "Resolve a conversa quando a pergunta é "
       "respondida.", group="chatwoot"),
)

# Which keys make a bridge usable. A bridge with none of them set is simply off; a bridge with
# some set but not all is a configuration error (one line listing every missing key).
BRIDGE_REQUIRED = {
    "whatsapp": ("KOMMO_BASE_URL", "KOMMO_WEBHOOK_SECRET", "N8N_WEBHOOK_URL", "N8N_API_KEY"),
    "mercadolivre": ("ML_CLIENT_ID", "ML_CLIENT_SECRET", "ML_SELLER_ID", "CHATWOOT_BASE_URL",
                     "CHATWOOT_API_TOKEN", "CHATWOOT_ACCOUNT_ID", "CHATWOOT_QUESTIONS_INBOX_ID",
                     "CHATWOOT_SALES_INBOX_ID"),
}

_TRUE = {"1", "true", "yes", "on", "sim", "s"}
_FALSE = {"0", "false", "no", "off", "nao", "não", "n", ""}


def is_placeholder(value: str) -> bool:
    """True for empty values and the seed README's placeholders (`seu_client_id`, ...)."""
    return not value.strip() or bool(_PLACEHOLDER_PATTERN.match(value.strip()))


def _convert(setting: Setting, raw: str) -> Any:
    raw = raw.strip()
    if setting.kind in ("int", "float"):
        try:
            return int(raw) if setting.kind == "int" else float(raw)
        except ValueError:
            whole = " inteiro" if setting.kind == "int" else ""
            raise ValueError(f"precisa ser um número{whole}") from None
    if setting.kind == "bool":
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("use true ou false")
    if setting.kind == "choice":
        for choice in setting.choices:
            if raw.lower() == choice.lower():
                return choice
        raise ValueError("use " + ", ".join(setting.choices))
    if setting.kind == "id":
        if not re.fullmatch(r"[0-9]+", raw):
            raise ValueError(f"'{raw}' não é um id: use só os dígitos do id")
        return raw
    if setting.kind == "url":
        if raw and not re.match(r"^https?://[^\s/]+", raw):
            raise ValueError("precisa começar com http:// ou https://")
        return raw.rstrip("/")
    return raw


def mask(value: Any) -> str:
    """The redacted form of a secret: never any of its characters."""
    return "***" if value not in ("", None) else ""


def _settings_repr(self) -> str:
    parts = []
    for s in SETTINGS:
        value = getattr(self, s.attr)
        parts.append(f"{s.attr}={mask(value) if s.secret else value!r}")
    return "Settings(" + ", ".join(parts) + ")"


Settings = dataclasses.make_dataclass(
    "Settings",
    [(s.attr, Any, field(default=s.default)) for s in SETTINGS]
    + [("enabled_bridges", tuple, field(default=()))],
    frozen=True,
    namespace={
        "__repr__": _settings_repr,
        "__str__": _settings_repr,
        "__doc__": "All settings of ponte, frozen. Build it with `load_settings()`.",
        "bridge_enabled": lambda self, name: name in self.enabled_bridges,
        "replace": lambda self, **changes: dataclasses.replace(self, **changes),
    },
)


def load_settings(environ: Mapping[str, str] | None = None, *,
                  partial_bridges_ok: bool = False) -> "Settings":
    """Build `Settings` from `environ` (default: `os.environ`, after loading `.env` if present).

    Raises `ConfigError` listing every invalid value and every half-configured bridge at once
    (`partial_bridges_ok=True` lets setup commands run while a bridge is being configured).
    """
    if environ is None:
        _load_dotenv()
        environ = os.environ
    values: dict[str, Any] = {}
    problems: list[str] = []
    invalid_names: set[str] = set()
    for s in SETTINGS:
        raw = environ.get(s.name)
        if raw is None or (s.kind in ("str", "url", "id") and is_placeholder(raw)):
            values[s.attr] = s.default
            continue
        try:
            values[s.attr] = _convert(s, raw)
            _check_range(s, values[s.attr])
        except ValueError as exc:
            problems.append(f"{s.name} inválido ({exc})")
            invalid_names.add(s.name)
            values[s.attr] = s.default
    enabled, configured = [], []  # configured: some of the bridge's settings are given
    for bridge, keys in BRIDGE_REQUIRED.items():
        invalid = [k for k in keys if k in invalid_names]
        missing = [k for k in keys if values[k.lower()] in ("", None) and k not in invalid]
        if len(missing) == len(keys) and not invalid:
            continue  # bridge not configured at all: off, not an error
        configured.append(bridge)
        if missing:
            if not partial_bridges_ok:
                problems.append(f"ponte '{bridge}' incompleta, faltam: {', '.join(missing)}")
        elif not invalid:
            enabled.append(bridge)
    # At start, the checks below run for every bridge with some settings given, so that one
    # message lists everything still missing; a setup command only needs a complete bridge's
    # Kommo credential.
    if "whatsapp" in (enabled if partial_bridges_ok else configured) and \
            not _kommo_credential_given(values):
        problems.append("ponte 'whatsapp' sem credencial do Kommo: defina KOMMO_ACCESS_TOKEN ou "
                        "KOMMO_CLIENT_ID + KOMMO_CLIENT_SECRET")
    if "mercadolivre" in configured and not partial_bridges_ok:
        # Without these the bridge starts but cannot work: every agent reply would get 401, and
        # nobody could connect the Mercado Livre account.
        if not (values["chatwoot_webhook_secret"] or values["chatwoot_webhook_token"]):
            problems.append("ponte 'mercadolivre' sem autenticação do webhook do Chatwoot: "
                            "defina CHATWOOT_WEBHOOK_SECRET ou CHATWOOT_WEBHOOK_TOKEN")
        if not (values["ml_redirect_uri"] or values["public_base_url"]
                or values["ml_refresh_token"]):
            problems.append("ponte 'mercadolivre' sem endereço de volta do OAuth: defina "
                            "PUBLIC_BASE_URL (ou ML_REDIRECT_URI)")
    # Not for setup commands: `kommo_setup create-field` is how one gets the field id.
    if values["kommo_reply_mode"] == "salesbot" and "whatsapp" in configured and \
            not partial_bridges_ok:
        missing = [k for k in ("KOMMO_SALESBOT_ID", "KOMMO_REPLY_FIELD_ID") if not values[k.lower()]]
        if missing:
            problems.append("KOMMO_REPLY_MODE=salesbot exige: " + ", ".join(missing))
    problems += _ml_ai_problems(values, invalid_names)
    try:
        parse_lane_limits(values["poller_lane_limits"])
    except ValueError as exc:
        problems.append(f"POLLER_LANE_LIMITS inválido ({exc})")
    if values["kommo_max_rps"] < 0:
        problems.append("KOMMO_MAX_RPS inválido (use de 1 a 7, ou 0 para nenhum limite)")
    if problems:
        raise ConfigError(problems)
    return Settings(**values, enabled_bridges=tuple(enabled))


def _check_range(setting: Setting, value: Any) -> None:
    """Raise ValueError (in Portuguese) when a number is outside its declared range."""
    low, high = setting.minimum, setting.maximum
    if setting.kind not in ("int", "float") or (low is None and high is None):
        return
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            raise ValueError(f"o mínimo é {low:g}")
        raise ValueError(f"use de {low:g} a {high:g}")


ML_AI_OFF = "desligado"
_HOURS_PATTERN = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def parse_ai_hours(text: str) -> tuple[int, int] | None:
    """`18:00-08:00` → (1080, 480), minutes since midnight of the start and the end (the
    window may cross midnight); None for an empty text. Raises ValueError (in Portuguese)."""
    if not (text or "").strip():
        return None
    match = _HOURS_PATTERN.match(text)
    if not match:
        raise ValueError("use HH:MM-HH:MM, ex.: 18:00-08:00")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError("horas de 00:00 a 23:59")
    if (h1, m1) == (h2, m2):
        raise ValueError("início e fim iguais; deixe vazio para o dia todo")
    return h1 * 60 + m1, h2 * 60 + m2


def _ml_ai_problems(values: Mapping[str, Any], invalid_names: set[str]) -> list[str]:
    """The ML_AI_* rules. They belong to bridge B alone: none of them is in BRIDGE_REQUIRED,
    so they never make a bridge count as half-configured."""
    problems = []
    try:
        parse_ai_hours(values["ml_ai_hours"])
    except ValueError as exc:
        problems.append(f"ML_AI_HOURS inválido ({exc})")
    try:
        import zoneinfo
        zoneinfo.ZoneInfo(values["ml_ai_timezone"] or "America/Sao_Paulo")
    except (ValueError, KeyError, OSError) as exc:  # ZoneInfoNotFoundError is a KeyError
        if (values["ml_ai_timezone"] or "") != "America/Sao_Paulo":  # has a fixed fallback
            problems.append(f"ML_AI_TIMEZONE inválido ({type(exc).__name__}: fuso desconhecido)")
    if values["ml_ai_mode"] != ML_AI_OFF and "ML_AI_MODE" not in invalid_names:
        missing = [k for k in ("ML_AI_WEBHOOK_URL", "ML_AI_API_KEY")
                   if not values[k.lower()] and k not in invalid_names]
        if missing:
            problems.append(f"ML_AI_MODE={values['ml_ai_mode']} exige: " + ", ".join(missing))
    if values["ml_ai_timeout_seconds"] <= 0:
        problems.append("ML_AI_TIMEOUT_SECONDS inválido (precisa ser maior que zero)")
    return problems


def parse_lane_limits(text: str) -> dict[str, int]:
    """`n8n=24,kommo=8` → {"n8n": 24, "kommo": 8}; raises ValueError (in Portuguese)."""
    limits: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        lane, sep, number = part.partition("=")
        lane, number = lane.strip(), number.strip()
        if not sep or not re.fullmatch(r"[a-z0-9_]+", lane) or not re.fullmatch(r"[0-9]+", number) \
                or int(number) < 1:
            raise ValueError(f"'{part}' não é parceiro=número (número ≥ 1)")
        limits[lane] = int(number)
    return limits


def _kommo_credential_given(values: Mapping[str, Any]) -> bool:
    return bool(values["kommo_access_token"]
                or (values["kommo_client_id"] and values["kommo_client_secret"]))


def kommo_credential_given(settings: "Settings") -> bool:
    """Whether Kommo can be called: a long-lived token, or an OAuth client id and secret."""
    return _kommo_credential_given(vars(settings))


# Kommo blocks an integration that makes more than 7 requests per second.
KOMMO_RPS_LIMIT = 7
MIN_WEBHOOK_SECRET_LENGTH = 16
MIN_ADMIN_TOKEN_LENGTH = 16
# Polling Mercado Livre more often than this spends its request quota for nothing (its
# notifications bring news sooner); tests and the demo poll faster on purpose.
SANE_MIN_POLL_SECONDS = 10


def warnings(settings: "Settings") -> list[str]:
    """Settings that work but are probably a mistake (`--check` prints them and goes on)."""
    found = []
    if not settings.enabled_bridges:
        found.append("nenhuma ponte configurada (veja env.example); só as rotas de operação "
                     "(/, /health, /config, /metrics, /admin/*) vão responder.")
    if not settings.admin_token:
        found.append("ADMIN_TOKEN vazio; /config e /admin/* vão recusar todo pedido (401), e "
                     "/bot/* só aceita o N8N_API_KEY.")
    elif len(settings.admin_token) < MIN_ADMIN_TOKEN_LENGTH:
        found.append(f"ADMIN_TOKEN tem menos de {MIN_ADMIN_TOKEN_LENGTH} caracteres: ele abre o "
                     "painel e pausa bots; use um texto longo e aleatório "
                     "(ex.: openssl rand -hex 24).")
    if settings.environment == "production" and settings.bridge_enabled("mercadolivre"):
        for name in ("ML_POLL_QUESTIONS_SECONDS", "ML_POLL_MESSAGES_SECONDS"):
            if getattr(settings, name.lower()) < SANE_MIN_POLL_SECONDS:
                found.append(f"{name}={getattr(settings, name.lower())}: consultar o Mercado "
                             f"Livre a cada menos de {SANE_MIN_POLL_SECONDS} s gasta a cota de "
                             "pedidos à toa (as notificações já trazem as novidades); use 30 ou "
                             "mais.")
    if settings.ml_ai_mode != ML_AI_OFF and not settings.bridge_enabled("mercadolivre"):
        found.append(f"ML_AI_MODE={settings.ml_ai_mode} sem a ponte 'mercadolivre' configurada: "
                     "a IA só responde perguntas do Mercado Livre que chegam ao Chatwoot.")
    if settings.bridge_enabled("whatsapp"):
        if len(settings.kommo_webhook_secret) < MIN_WEBHOOK_SECRET_LENGTH:
            found.append(f"KOMMO_WEBHOOK_SECRET tem menos de {MIN_WEBHOOK_SECRET_LENGTH} "
                         "caracteres: quem adivinhar a URL do webhook pode falar pela sua "
                         "conta; use um texto longo e aleatório.")
        if not 0 < settings.kommo_max_rps <= KOMMO_RPS_LIMIT:
            what = f"KOMMO_MAX_RPS={settings.kommo_max_rps:g}"
            if settings.kommo_max_rps == 0:
                what += " desliga o limite"
            # Above the limit the Kommo client lowers it (kommo_api): the account stays safe.
            found.append(f"{what}: o Kommo bloqueia a integração que passa de "
                         f"{KOMMO_RPS_LIMIT} pedidos por segundo; use de 1 a {KOMMO_RPS_LIMIT}"
                         + (f" (a ponte usa {KOMMO_RPS_LIMIT})."
                            if settings.kommo_max_rps > KOMMO_RPS_LIMIT else "."))
    return found


def redacted_settings(settings: "Settings") -> dict[str, Any]:
    """Every setting by its environment name, secrets masked: what `/config` shows."""
    out = {}
    for s in SETTINGS:
        value = getattr(settings, s.attr)
        out[s.name] = mask(value) if s.secret else value
    return out


def split_list(value: str | None) -> list[str]:
    """The items of a comma-separated setting (e.g. one webhook secret per Chatwoot inbox)."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def secret_values(settings: "Settings") -> list[str]:
    """The raw secret values, so logs can be scrubbed of them — each item of a comma-separated
    one too; longest first, so a secret that contains another is replaced whole."""
    values = set()
    for s in SETTINGS:
        if s.secret:
            raw = str(getattr(settings, s.attr))
            values.update([raw, *split_list(raw)])
    return sorted((v for v in values if len(v) >= 4), key=lambda v: (-len(v), v))


def _load_dotenv() -> None:
    try:
        from dotenv import load_dotenv
    except ImportError:  # pragma: no cover - dotenv is in requirements
        return
    load_dotenv(os.environ.get("PONTE_ENV_FILE", ".env"), override=False)


def _range_text(s: Setting) -> str:
    if s.maximum is not None:
        return f" De {s.minimum:g} a {s.maximum:g}."
    if s.minimum is not None:
        return f" Mínimo: {s.minimum:g}."
    return " Só dígitos." if s.kind == "id" else ""


def check(stream=None) -> "Settings | None":
    """What `python config.py --check` does: the settings, with every warning written to
    `stream` (stderr); None after writing every problem (the caller exits with 2)."""
    import sys
    stream = stream or sys.stderr
    try:
        found = load_settings()
    except ConfigError as exc:
        print("ponte: " + str(exc), file=stream)
        print("ponte: corrija o .env (ou as variáveis de ambiente) e inicie de novo; "
              "para desligar uma ponte, deixe todas as variáveis dela vazias.", file=stream)
        return None
    for warning in warnings(found):
        print("ponte: aviso: " + warning, file=stream)
    return found


def env_example() -> str:
    """The text of `env.example`, generated from `SETTINGS` so the two cannot drift."""
    lines = ["# ponte — configuração. Copie para .env e preencha.",
             "# Gerado a partir de config.py (python config.py --env-example).",
             "# Linhas comentadas mostram o valor padrão: descomente só o que quiser mudar",
             "# (no Docker, DATABASE_PATH e LOG_DIR já apontam para o volume /data).", ""]
    group = None
    for s in SETTINGS:
        if s.group != group:
            group = s.group
            lines += ["", f"# ===== {group} ====="]
        unit = f" [{s.unit}]" if s.unit else ""
        lines.append(f"# {s.help}{_range_text(s)}{unit}" + (" (segredo)" if s.secret else ""))
        default = s.default
        if isinstance(default, bool):
            default = "true" if default else "false"
        lines.append(f"# {s.name}={default}" if default != "" else f"{s.name}=")
    return "\n".join(lines).strip() + "\n"


def settings_table_markdown() -> str:
    """The README's configuration table, generated from `SETTINGS`."""
    rows = ["| variável | padrão | unidade | descrição |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = s.default
        if isinstance(default, bool):
            default = "true" if default else "false"
        default = f"`{default}`" if default != "" else "—"
        help_text = s.help + _range_text(s) + (" **Segredo.**" if s.secret else "")
        rows.append(f"| `{s.name}` | {default} | {s.unit or '—'} | {help_text} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - helper for maintainers
    import sys

    if "--help" in sys.argv or "-h" in sys.argv:
        print("uso: python config.py [--check | --env-example | --table]\n"
              "  (sem opção)     mostra as configurações lidas do ambiente e do .env, segredos "
              "mascarados\n"
              "  --check         confere tudo: lista de uma vez o que falta ou é inválido (sai "
              "com 2) e os avisos\n"
              "  --env-example   escreve o env.example\n"
              "  --table         escreve a tabela de configurações do README")
    elif "--env-example" in sys.argv:
        sys.stdout.write(env_example())
    elif "--check" in sys.argv:
        # Used before starting Supervisor: one clear message instead of programs that keep
        # crashing with it.
        if check() is None:
            sys.exit(2)
    elif "--table" in sys.argv:
        print(settings_table_markdown())
    else:
        try:
            print(load_settings())
        except ConfigError as exc:
            print("\n".join(exc.problems))
            sys.exit(1)
