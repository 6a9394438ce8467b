// "Show implemented methods only" on the taxonomy page: toggles a class the stylesheet reads.
document.addEventListener("DOMContentLoaded", function () {
  var box = document.getElementById("rlvg-implemented-only");
  var table = document.querySelector("table.taxonomy");
  if (!box || !table) return;
  box.addEventListener("change", function () {
    table.classList.toggle("implemented-only", box.checked);
  });
});
