const slider = document.getElementById("epoch"), img = document.getElementById("grid"),
      label = document.getElementById("label");
function show() {
  const e = epochs[Number(slider.value)];
  img.src = "samples/epoch_" + String(e).padStart(3, "0") + ".png";
  label.textContent = "epoch " + e + (e === best ? " ★ best" : "");
}
if (slider) { slider.addEventListener("input", show); show(); }
