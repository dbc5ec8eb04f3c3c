"""Local stand-ins for ponte's peers (Kommo, n8n, Mercado Livre, Chatwoot): stateful HTTP
servers that follow the references in ../shared/reference, for tests, the demo and benchmarks."""
