"use strict";
// Sends the key once; the server answers with an HttpOnly session cookie, then the console loads.
const form = document.getElementById("login");
const error = document.getElementById("login-error");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const field = document.getElementById("key");
  error.textContent = "";
  let response;
  try {
    response = await fetch("/console/session", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Binder-Console": "1" },
      body: JSON.stringify({ key: field.value }),
      credentials: "same-origin",
    });
  } catch (err) {
    error.textContent = "The server is unreachable; try again in a moment.";
    return;
  }
  field.value = "";
  if (response.ok) {
    window.location.reload();
  } else if (response.status === 403) {
    error.textContent = "That key is not this server's API key.";
    field.focus();
  } else {
    error.textContent = `The server answered ${response.status}; try again.`;
  }
});
