// The event list's "select all" box; without JavaScript each row is ticked by hand.
document.querySelectorAll("table.sync-events input.select-all").forEach(function (all) {
  var boxes = all.closest("table").querySelectorAll('tbody input[name="event"]');
  all.hidden = false;
  all.addEventListener("change", function () {
    boxes.forEach(function (box) { box.checked = all.checked; });
  });
});
