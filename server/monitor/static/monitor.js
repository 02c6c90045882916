// panda-wms monitor: click a table header to sort its rows (numbers as numbers).
document.addEventListener("click", function (ev) {
  var th = ev.target.closest("th");
  if (!th || !th.closest("table.sortable")) return;
  var table = th.closest("table"), body = table.tBodies[0];
  var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
  var asc = th.dataset.sort !== "asc";
  th.dataset.sort = asc ? "asc" : "desc";
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = a.cells[idx] ? a.cells[idx].textContent.trim() : "";
    var y = b.cells[idx] ? b.cells[idx].textContent.trim() : "";
    var nx = parseFloat(x), ny = parseFloat(y);
    var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
    return asc ? c : -c;
  });
  rows.forEach(function (r) { body.appendChild(r); });
});
