// ponte — painel: o único JavaScript é o botão "Copiar" das URLs (o resto funciona sem JS).
document.addEventListener("click", function (event) {
  var button = event.target.closest(".copy-button");
  if (!button) return;
  var text = button.getAttribute("data-copy");
  var done = function () {
    button.textContent = "Copiado!";
    setTimeout(function () { button.textContent = "Copiar"; }, 1500);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done);
  } else {  // http:// sem TLS: seleciona o campo para Ctrl+C
    var input = button.parentNode.querySelector("input");
    input.focus(); input.select();
    try { document.execCommand("copy"); done(); } catch (e) { /* o campo fica selecionado */ }
  }
});
