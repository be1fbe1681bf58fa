// The console's sign-in: check the key against the admin API, then keep it in a same-site cookie,
// which the page load (/console) and the console's script (as a bearer token) both use.
"use strict";

document.getElementById("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = document.getElementById("login-key").value.trim();
  const out = document.getElementById("login-error");
  const r = await fetch("/v1/admin/whoami", {headers: {authorization: "Bearer " + key}});
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    out.textContent = (body.error && body.error.message) || ("refused: HTTP " + r.status);
    return;
  }
  const secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = "concilium_admin=" + encodeURIComponent(key) + "; Path=/; SameSite=Strict" + secure;
  location.reload();
});
