// The dashboard works without JavaScript; this only saves a click.
document.documentElement.classList.add("js");

// A period chosen in the overview shows at once, without pressing "Show".
for (const select of document.querySelectorAll("select[data-autosubmit]")) {
  select.addEventListener("change", () => select.form.requestSubmit());
}
