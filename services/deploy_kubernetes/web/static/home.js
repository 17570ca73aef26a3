"use strict";
// Copy buttons for the badge snippets (the snippets stay selectable without script).
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const field = document.getElementById(button.dataset.copy);
  field.select();
  const label = button.textContent;
  try {
    await navigator.clipboard.writeText(field.value);
    button.textContent = "Copied";
  } catch (err) {
    button.textContent = "Press Ctrl+C to copy";
  }
  setTimeout(() => { button.textContent = label; }, 2000);
});

// A path to open in the app, typed in a card: added to its badge's link and to the snippets.
document.addEventListener("input", (event) => {
  const field = event.target.closest("input.urlpath");
  if (!field) return;
  const { card, name, launch, badge } = field.dataset;
  const path = field.value.trim().replace(/^\/+/, "");
  const target = path ? `${launch}?urlpath=${encodeURIComponent(path)}` : launch;
  document.getElementById(`badge-link-${card}`).href = target;
  document.getElementById(`md-${card}`).value = `[![launch ${name}](${badge})](${target})`;
  document.getElementById(`html-${card}`).value = `<a href="${target}"><img src="${badge}" alt="launch ${name}"></a>`;
});
